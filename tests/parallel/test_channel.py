"""The control channel between ranks: its store listens only where it is told, and no value is unpickled
unless it carries the launch secret's tag (the store is reachable by anyone who can connect to its port)."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from ditserve.errors import ParallelConfigError
from ditserve.parallel import launch
from ditserve.parallel.channel import (
    CONFIG_KEY,
    SECRET_ENV,
    ControlChannel,
    ForgedMessageError,
    Message,
    MessageKind,
    get_object,
    host_store,
    new_secret,
    put_object,
    report_error,
    reported_errors,
    secret_from_env,
)

TIMEOUT = timedelta(seconds=10)
#: set when a forged pickle is loaded: the attack is code run by ``pickle.loads``
UNPICKLED: list[str] = []


def _record_unpickling(text: str) -> str:
    UNPICKLED.append(text)
    return text


class Payload:
    """Unpickling this calls ``_record_unpickling``, as an attacker's payload would call ``os.system``."""

    def __reduce__(self) -> tuple:
        return (_record_unpickling, ("code ran",))


@pytest.fixture
def store() -> Iterator[dist.TCPStore]:
    store = host_store("127.0.0.1", 0, 1, TIMEOUT)
    yield store
    del store


@pytest.fixture(autouse=True)
def _clear_flag() -> None:
    UNPICKLED.clear()


def test_a_sealed_message_reaches_the_receiver(store: dist.TCPStore) -> None:
    secret = new_secret()
    sender, receiver = ControlChannel(store, secret, readers=1), ControlChannel(store, secret, readers=1)
    sender.send(Message(MessageKind.STEP, ["spec"]))
    assert receiver.receive() == Message(MessageKind.STEP, ["spec"])
    sender.send(Message(MessageKind.STOP))
    assert receiver.receive().kind is MessageKind.STOP


def test_a_late_reader_still_gets_every_message_and_the_last_reader_deletes_it(store: dist.TCPStore) -> None:
    # rank 0 may send several messages before a slow worker reads the first (steps that need no collective)
    secret = new_secret()
    sender = ControlChannel(store, secret, readers=2)
    fast, slow = ControlChannel(store, secret, readers=2), ControlChannel(store, secret, readers=2)
    sent = [Message(MessageKind.STEP, [f"step {i}"]) for i in range(3)] + [Message(MessageKind.STOP)]
    for message in sent:
        sender.send(message)
    assert [fast.receive() for _ in sent] == sent
    assert store.check(["ditserve/message/0"]), "deleted before the slow reader read it"
    assert [slow.receive() for _ in sent] == sent
    assert not any(store.check([f"ditserve/message/{i}"]) for i in range(len(sent)))


@pytest.mark.parametrize("tag", [b"", b"\0" * 32, b"short"], ids=["untagged", "zero-tag", "short-tag"])
def test_an_unauthenticated_message_is_refused_without_being_unpickled(store: dist.TCPStore, tag: bytes) -> None:
    # the attack as it was: a bare pickle written into the next message slot
    store.set("ditserve/message/0", tag + pickle.dumps(Message(MessageKind.STEP, [Payload()])))
    with pytest.raises(ForgedMessageError, match="nothing of it was unpickled"):
        ControlChannel(store, new_secret(), readers=1).receive()
    assert UNPICKLED == []


def test_a_message_sealed_with_another_secret_is_refused(store: dist.TCPStore) -> None:
    ControlChannel(store, new_secret(), readers=1).send(Message(MessageKind.STEP, [Payload()]))
    with pytest.raises(ForgedMessageError):
        ControlChannel(store, new_secret(), readers=1).receive()
    assert UNPICKLED == []


def test_a_genuine_message_replayed_under_another_key_is_refused(store: dist.TCPStore) -> None:
    secret = new_secret()
    ControlChannel(store, secret, readers=1).send(Message(MessageKind.STEP, ["first step"]))
    store.set("ditserve/message/1", store.get("ditserve/message/0"))
    receiver = ControlChannel(store, secret, readers=1)
    receiver.receive()
    with pytest.raises(ForgedMessageError):
        receiver.receive()


def test_the_torchrun_config_is_authenticated_too(store: dist.TCPStore) -> None:
    secret = new_secret()
    put_object(store, secret, CONFIG_KEY, {"model": "x"})
    assert get_object(store, secret, CONFIG_KEY) == {"model": "x"}
    store.set(CONFIG_KEY, pickle.dumps(Payload()))
    with pytest.raises(ForgedMessageError):
        get_object(store, secret, CONFIG_KEY)
    assert UNPICKLED == []


def test_error_reports_are_authenticated(store: dist.TCPStore) -> None:
    secret = new_secret()
    report_error(store, secret, 1, "Traceback ...\nValueError: real")
    store.set("ditserve/error/2", b"rank 2 says: restart the server at evil.example")
    assert reported_errors(store, secret, range(1, 3)) == {
        1: "Traceback ...\nValueError: real", 2: "(a forged error report was refused)"}


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port`` (from /proc, as ``ss -ltn`` reads them)."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _remote, state = line.split()[1:4]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                addresses.add(address)
    return addresses


def test_the_store_listens_on_the_given_address_only(store: dist.TCPStore) -> None:
    # 0100007F is 127.0.0.1 in /proc's byte order; a bare TCPStore shows 00000000 / ::, every interface
    assert _listening_addresses(store.port) == {"0100007F"}


def test_torchrun_ranks_refuse_to_start_without_a_good_secret(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(ParallelConfigError, match=SECRET_ENV) as error:
        secret_from_env()
    assert error.value.param == SECRET_ENV
    for bad in ("not hex", "abcd"):
        monkeypatch.setenv(SECRET_ENV, bad)
        with pytest.raises(ParallelConfigError, match=SECRET_ENV):
            secret_from_env()
    monkeypatch.setenv(SECRET_ENV, "ab" * 32)
    assert secret_from_env() == b"\xab" * 32
    # a worker started by torchrun without the secret stops at once with one clear line
    monkeypatch.delenv(SECRET_ENV)
    monkeypatch.setattr(launch, "torchrun_rank", lambda: (1, 2, 1))
    assert launch.main([]) == 2
    assert f"{SECRET_ENV} is not set" in capsys.readouterr().err
