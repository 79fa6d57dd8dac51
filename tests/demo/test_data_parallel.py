import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from ditserve.demo import demo_model_path
from ditserve.demo.cli import main
from ditserve.demo.data_parallel import DataShard
from ditserve.errors import InvalidParameterError


def test_rows_give_each_process_its_own_block_and_refuse_a_remainder():
    shards = [DataShard(rank, 4) for rank in range(4)]
    covered = [i for shard in shards for i in range(16)[shard.rows(16)]]
    assert covered == list(range(16))
    with pytest.raises(InvalidParameterError, match="batch .*multiple") as error:
        shards[0].rows(6)
    assert error.value.param == "batch"
    assert DataShard().rows(6) == slice(0, 6)


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_two_processes_train_as_one_on_the_same_batches(tmp_path):
    """torchrun with two processes, each on half of every batch with averaged gradients, trains what one process
    does: the same first loss, the same weights up to float rounding, and one log and one output from rank 0."""
    options = ["train", "--task", "edit", "--steps", "2", "--batch", "2", "--warmup-steps", "1", "--log-every", "1"]
    main([*options, "--run-dir", str(tmp_path / "one"), "--output", str(tmp_path / "one-out")])
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "-m", "ditserve.demo", *options, "--run-dir", str(tmp_path / "two"), "--output", str(tmp_path / "two-out")]
    done = subprocess.run(launch, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["step"] for r in two if "loss" in r] == [0, 1]  # rank 0 alone logs
    assert two[-1]["processes"] == 2
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-3)
    base = FluxPipeline.from_pretrained(str(demo_model_path())).transformer.state_dict()
    trained = [FluxTransformer2DModel.from_pretrained(str(tmp_path / f"{run}-out" / "transformer")).state_dict()
               for run in ("one", "two")]
    update = torch.cat([(trained[0][k] - base[k]).flatten() for k in base]).norm()
    apart = torch.cat([(trained[1][k] - trained[0][k]).flatten() for k in base]).norm()
    assert update > 0
    # Adam's first steps move a weight by about lr x the sign of its gradient, so bf16 rounding flips the weights
    # whose gradient is near zero: 8 % apart on this machine; without the averaging, 100 % (measured)
    assert apart < 0.25 * update
