import json
import math

import pytest
import torch
from diffusers import WanPipeline

from ditserve.demo.cli import main
from ditserve.demo.data_parallel import DataShard
from ditserve.demo.language import COLORS, POSITIONS
from ditserve.demo.model import MAX_SEQUENCE_LENGTH
from ditserve.demo.object_probe import ObjectProbe
from ditserve.demo.text_pretrain import CELLS, EMPTY
from ditserve.demo.video_evaluation import decoded_ground_truth_clips
from ditserve.demo.video_language import parse_video_prompt
from ditserve.demo.video_model import (
    POSTERIOR_LOG_VARIANCE,
    build_video_pipeline,
    build_video_vae,
    text_embeddings,
    wan_pipeline_num_frames,
)
from ditserve.demo.video_render import clip_layout, render_clip_batch
from ditserve.demo.video_train import (
    VaeStage,
    VideoTrainConfig,
    _clip_parse_targets,
    _one_frame_each,
    flow_matching_batch,
    flow_sigmas,
    normalized_latents,
    probe_targets,
    train_video,
    vae_stage_settings,
)
from ditserve.errors import InvalidParameterError

PROMPT = "a large red square moves from the top left to the bottom right and a small blue circle at the top right"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def video_pipe() -> WanPipeline:
    """An untrained pipeline whose latent normalisation is not the identity, so that a wrong convention shows."""
    torch.manual_seed(0)
    pipe = build_video_pipeline()
    pipe.vae.register_to_config(latents_mean=[0.05 * i - 0.4 for i in range(16)], latents_std=[0.7] * 16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_frame_stage_takes_one_frame_of_each_clip_as_a_one_frame_clip():
    videos = torch.arange(4 * 9, dtype=torch.float32).view(4, 1, 9, 1, 1).expand(4, 3, 9, 2, 2)
    frames = _one_frame_each(videos, torch.Generator().manual_seed(0))
    assert frames.shape == (4, 3, 1, 2, 2)
    picked = frames[:, 0, 0, 0, 0].long()
    assert torch.equal(picked // 9, torch.arange(4))  # each clip gives one of its own frames
    assert len(set((picked % 9).tolist())) > 1  # not the same frame index for every clip


def test_the_vae_encodes_and_decodes_each_frame_on_its_own_and_training_keeps_it_so():
    torch.manual_seed(0)
    vae = build_video_vae()
    clip = torch.rand(1, 3, 5, 32, 32) * 2 - 1

    def alone_and_together():
        with torch.no_grad():
            latents = vae.encode(clip).latent_dist.mode()
            frame_latents = torch.cat([vae.encode(clip[:, :, [i]]).latent_dist.mode() for i in range(5)], dim=2)
            decoded = vae.decode(latents).sample
            frames = torch.cat([vae.decode(latents[:, :, [i]]).sample for i in range(5)], dim=2)
        return latents, frame_latents, decoded, frames

    latents, frame_latents, decoded, frames = alone_and_together()
    assert latents.shape[2] == 5 and decoded.shape == clip.shape  # a latent frame per frame
    torch.testing.assert_close(latents, frame_latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(decoded, frames, rtol=0, atol=1e-5)
    # a training step on single frames (as every VAE stage takes them) leaves the earlier frames' taps at zero
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-2)
    frame = _one_frame_each(clip, torch.Generator().manual_seed(0))
    vae.decode(vae.encode(frame).latent_dist.mode()).sample.square().mean().backward()
    optimizer.step()
    assert torch.equal(vae.encoder.conv_in.weight[:, :, :-1], torch.zeros_like(vae.encoder.conv_in.weight[:, :, :-1]))
    latents, frame_latents, decoded, frames = alone_and_together()
    torch.testing.assert_close(decoded, frames, rtol=0, atol=1e-5)


def test_only_the_first_vae_stage_is_unweighted_with_the_long_warm_up():
    config = VideoTrainConfig(frame_steps=2400, vae_steps=800, decoder_steps=100, vae_edge_weight=6.0)
    frames, edges, decoder = (vae_stage_settings(stage, config) for stage in VaeStage)
    assert (frames.steps, frames.lr, frames.warmup_steps, frames.edge_weight) == (2400, 5e-4, 200, 0.0)
    assert (edges.steps, edges.lr, edges.warmup_steps, edges.edge_weight) == (800, 3e-4, 50, 6.0)
    assert (decoder.steps, decoder.lr, decoder.warmup_steps, decoder.edge_weight) == (100, 2e-4, 10, 6.0)
    assert len({frames.data_stage, edges.data_stage, decoder.data_stage}) == 3  # each stage draws its own clips


def test_the_untrained_posterior_is_narrow_so_its_samples_carry_the_means():
    torch.manual_seed(0)
    vae = build_video_vae()
    with torch.no_grad():
        posterior = vae.encode(torch.rand(2, 3, 5, 32, 32) * 2 - 1).latent_dist
    assert (posterior.logvar - POSTERIOR_LOG_VARIANCE).abs().max() < 1  # (the 0 default: unit noise)
    assert posterior.std.max() < 0.5 * posterior.mean.std()  # at 0: seven times the spread of the means


def _run(pipe: WanPipeline, **kwargs):
    return pipe(prompt=PROMPT, height=128, width=128, num_frames=wan_pipeline_num_frames(9), guidance_scale=1.0,
                max_sequence_length=MAX_SEQUENCE_LENGTH, generator=torch.Generator().manual_seed(0), **kwargs)


def test_training_inputs_are_what_the_pipeline_feeds_the_transformer(video_pipe):
    """Latent shape, timesteps and text embeddings of training equal WanPipeline's at 128x128 and 9 frames."""
    calls = []
    hook = video_pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    try:
        _run(video_pipe, num_inference_steps=2, output_type="latent")
    finally:
        hook.remove()
    assert len(calls) == 2  # guidance_scale 1: one call a step
    videos = render_clip_batch([parse_video_prompt(PROMPT)], 9)
    with torch.no_grad():
        batch = flow_matching_batch(video_pipe, [PROMPT], videos, torch.Generator().manual_seed(0), MAX_SEQUENCE_LENGTH,
                                    noise_draws=3)
    assert calls[0]["hidden_states"].shape == (1, 16, 9, 16, 16) and batch.noisy.shape == (3, 16, 9, 16, 16)
    with torch.no_grad():  # as the pipeline runs (with gradients, attention takes another kernel: 1e-6 apart)
        assert torch.equal(calls[0]["encoder_hidden_states"],
                           text_embeddings(video_pipe, [PROMPT], CPU, MAX_SEQUENCE_LENGTH))
    assert torch.equal(batch.text, calls[0]["encoder_hidden_states"].expand(3, -1, -1))
    # UniPC's steps are u = 1 (less 1e-6) and u = (1 + 1/1000) / 2 through the flow shift: the pipeline passes
    # them as integers, sigma * 1000 truncated, and so does training
    sigmas = flow_sigmas(video_pipe.scheduler, torch.tensor([1.0 - 1e-6, (1 + 1 / 1000) / 2]))
    assert {call["timestep"].dtype for call in calls} == {batch.timestep.dtype} == {torch.int64}
    assert [call["timestep"].tolist() for call in calls] == [[999], [int(1000 * sigmas[1])]]
    assert torch.equal(batch.timestep, (1000 * batch.sigma).long())
    # training's noisy latents are (1 - sigma) x0 + sigma noise and its target noise - x0, so x0 = noisy - sigma *
    # target: the clip's normalised latents, whatever the three noise levels
    with torch.no_grad():
        x0 = normalized_latents(video_pipe, videos)
    torch.testing.assert_close(batch.noisy - batch.sigma[:, None, None, None, None] * batch.target,
                               x0.expand(3, -1, -1, -1, -1), rtol=0, atol=1e-4)
    assert len(set(batch.sigma.tolist())) == 3


def test_a_data_parallel_share_is_its_rows_of_the_whole_batch(video_pipe):
    """Two processes' shares of a batch (2 clips, 2 noise levels each): each share's noisy latents and targets are
    its clip's rows of the whole batch's, so the noise is drawn for the whole batch."""
    videos = render_clip_batch([parse_video_prompt(PROMPT)] * 2, 5)
    prompts = [PROMPT, ""]

    def batch(rows: slice):
        with torch.no_grad():
            return flow_matching_batch(video_pipe, prompts, videos, torch.Generator().manual_seed(0), MAX_SEQUENCE_LENGTH,
                                       noise_draws=2, rows=rows)

    whole = batch(slice(None))
    for rank in range(2):
        share = batch(DataShard(rank, 2).rows(2))
        for name in ("noisy", "target", "sigma", "text"):
            torch.testing.assert_close(getattr(share, name), getattr(whole, name)[2 * rank: 2 * rank + 2],
                                       rtol=0, atol=1e-5)


def test_several_processes_need_a_trained_vae_and_text_encoder(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InvalidParameterError, match="init-from") as error:
        train_video(VideoTrainConfig(run_dir=str(tmp_path / "run")), tmp_path / "out")
    assert error.value.param == "init_from"


def test_a_transformer_predicting_the_training_target_generates_the_clip(video_pipe):
    """Replace the transformer's output by the velocity training teaches, noise - x0, which on the straight path is
    (x_sigma - x0) / sigma: the pipeline must land on training's normalised latents and decode them to the decoded
    ground truth. This checks the prediction type and the latent normalisation end to end."""
    clip = parse_video_prompt(PROMPT)
    with torch.no_grad():
        x0 = normalized_latents(video_pipe, render_clip_batch([clip], 9))
    calls = []

    def exact(module, args, kwargs, output):
        # the sigma of this step (one call a step without guidance); the timestep holds it truncated
        sigma = video_pipe.scheduler.sigmas[len(calls) % 3]
        calls.append(sigma)
        return ((kwargs["hidden_states"] - x0) / sigma,)

    hook = video_pipe.transformer.register_forward_hook(exact, with_kwargs=True)
    try:
        latents = _run(video_pipe, num_inference_steps=3, output_type="latent").frames
        frames = _run(video_pipe, num_inference_steps=3, output_type="pt").frames
    finally:
        hook.remove()
    torch.testing.assert_close(latents, x0, rtol=0, atol=1e-3)
    truth = decoded_ground_truth_clips(video_pipe, [clip], 9)
    assert frames.shape == (1, 9, 3, 128, 128)
    torch.testing.assert_close(frames.transpose(1, 2), truth, rtol=0, atol=2e-3)


def test_probe_targets_follow_wan_token_order():
    """Latent frame t's tokens (64 a frame, row-major) show frame t: the moving square starts in the top-left cell
    and ends in the bottom-right one."""
    clip = parse_video_prompt(PROMPT)
    targets = probe_targets(clip_layout([clip], 9), clips=1, frames=9, cells_per_token=4, prompted=[True])
    assert targets.color.shape == targets.kind.shape == (1, 9 * 64, 16)
    red = COLORS.index("red")
    top_left, bottom_right = 1 * 8 + 1, 6 * 8 + 6  # tokens under the two cells' centres (pixels 21 and 106)
    last = 8 * 64
    assert (targets.color[0, top_left] == red).all() and (targets.color[0, last + bottom_right] == red).all()
    assert (targets.kind[0, bottom_right] == 0).all() and (targets.kind[0, last + top_left] == 0).all()
    assert targets.prompted.tolist() == [True]


def test_the_object_probe_reads_the_wan_transformer(video_pipe):
    transformer = build_video_pipeline().transformer
    probe = ObjectProbe(transformer, cells_per_token=4)
    clip = parse_video_prompt(PROMPT)
    targets = probe_targets(clip_layout([clip], 9), clips=1, frames=9, cells_per_token=4, prompted=[True])
    transformer(hidden_states=torch.randn(1, 16, 9, 16, 16), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, MAX_SEQUENCE_LENGTH, 64))
    loss = probe.loss(targets)
    loss.backward()
    assert loss > 0 and transformer.blocks[-1].ffn.net[0].proj.weight.grad.abs().sum() > 0
    probe.detach()


def test_clip_parse_targets_hold_the_first_and_the_last_frame():
    clips = [parse_video_prompt(p) for p in (
        PROMPT,
        "a small green triangle appears in the center on a black background",
        "a large yellow circle at the bottom turns purple",
    )]
    targets = _clip_parse_targets(clips, CPU)
    first, last = targets.cell_color[:, :CELLS], targets.cell_color[:, CELLS:]
    color = {name: COLORS.index(name) + 1 for name in COLORS}
    cell = {position.split(" ", 2)[2]: POSITIONS.index(position) for position in POSITIONS}
    assert first[0, cell["top left"]] == last[0, cell["bottom right"]] == color["red"]
    assert first[0, cell["bottom right"]] == last[0, cell["top left"]] == EMPTY
    assert first[0, cell["top right"]] == last[0, cell["top right"]] == color["blue"]
    assert first[1, cell["center"]] == EMPTY and last[1, cell["center"]] == color["green"]
    assert targets.background[1] == COLORS.index("black")
    assert first[2, cell["bottom"]] == color["yellow"] and last[2, cell["bottom"]] == color["purple"]


TINY_RUN = ["--frame-steps", "2", "--frame-batch", "2", "--vae-steps", "2", "--vae-batch", "2", "--decoder-steps", "2",
            "--vae-check-clips", "1", "--latent-statistics-clips", "2",
            "--text-steps", "2", "--text-batch", "8", "--steps", "2", "--first-frame-steps", "1", "--first-frame-batch", "3",
            "--batch", "2", "--noise-draws", "2", "--warmup-steps", "1", "--log-every", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps of every stage through the CLI, as a run directory and its exported folder."""
    root = tmp_path_factory.mktemp("video")
    main(["train", "--task", "video", "--run-dir", str(root / "run"), "--output", str(root / "out"), *TINY_RUN])
    return root / "run", root / "out"


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_two_steps_of_every_stage_export_a_folder_wan_pipeline_runs(trained):
    run_dir, output = trained
    assert json.loads((output / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    defaults = json.loads((output / "ditserve_defaults.json").read_text())["sampling_defaults"]
    assert defaults["num_frames"] == 9 and defaults["max_sequence_length"] == MAX_SEQUENCE_LENGTH
    log = _log(run_dir)
    for stage in ("vae_frames", "vae_edges", "decoder", "transformer"):
        losses = [r["loss"] for r in log if r.get("stage") == stage and "loss" in r]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses), stage
    assert all(r["probe_loss"] > 0 for r in log if r.get("stage") == "transformer" and "probe_loss" in r)
    # the first step on the clips' first frames alone, the second on whole clips
    assert [r["frames"] for r in log if r.get("stage") == "transformer" and "frames" in r] == [1, 9]
    assert {"vae_frames_check", "vae_edges_check", "decoder_check", "text_encoder", "done"} <= {r["stage"] for r in log}
    pipe = WanPipeline.from_pretrained(str(output))
    assert pipe.vae.config.latents_std != [1.0] * 16  # the trained latents' spread, not the placeholder
    video = pipe(prompt=PROMPT, height=128, width=128, num_frames=wan_pipeline_num_frames(9), num_inference_steps=2,
                 guidance_scale=3.0, max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="np").frames
    assert video.shape == (1, 9, 128, 128, 3)


def test_the_engine_serves_the_exported_folder_with_its_defaults(trained):
    """ditserve serves the folder as any WanPipeline, at the size, frame count and text length of its
    ditserve_defaults.json, and gives what diffusers gives."""
    from ditserve import Omni
    from ditserve.models.common import to_uint8_video
    from ditserve.testing.compare import max_abs_diff

    _, output = trained
    omni = Omni(model=str(output))
    try:
        (video,) = omni.generate(PROMPT, seed=3, num_inference_steps=2)[0].videos
    finally:
        omni.close()
    assert video.shape == (9, 128, 128, 3)
    pipe = WanPipeline.from_pretrained(str(output))
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPT, height=128, width=128, num_frames=wan_pipeline_num_frames(9), num_inference_steps=2,
                     guidance_scale=3.0, max_sequence_length=MAX_SEQUENCE_LENGTH,
                     generator=torch.Generator().manual_seed(3)).frames[0]
    assert max_abs_diff(video, to_uint8_video(reference)) <= 3


def test_a_resumed_run_continues_from_its_checkpoints(trained, tmp_path):
    run_dir, _ = trained
    log_before = len(_log(run_dir))
    config = VideoTrainConfig(run_dir=str(run_dir), frame_steps=2, frame_batch=2, vae_steps=2, vae_batch=2,
                              decoder_steps=2, vae_check_clips=1, latent_statistics_clips=2,
                              text_steps=2, text_batch=8, steps=3, batch=2, noise_draws=2, warmup_steps=1,
                              log_every=1, device="cpu")
    train_video(config, tmp_path / "out")
    new = _log(run_dir)[log_before:]
    # the VAE and the text encoder come back from their checkpoints; the transformer does its third step only
    assert [r["step"] for r in new if "step" in r] == [2]
    assert torch.load(run_dir / "transformer.pt")["step"] == 3


def test_eval_scores_held_out_clips_end_to_end(trained, tmp_path):
    _, output = trained
    report_path = tmp_path / "eval.json"
    main(["eval", "--task", "video", "--model", str(output), "--prompts", "2", "--steps", "2", "--cfg-sweep", "1,3",
          "--output", str(report_path)])
    report = json.loads(report_path.read_text())
    assert report["heldout_clips"] == 2 and report["frames"] == 9
    assert [(r["num_inference_steps"], r["guidance_scale"]) for r in report["results"]] == [(2, 1.0), (2, 3.0)]
    for figures in (*report["results"], report["decoded_ground_truth"]):
        assert figures["clips"] == 2 and 0 <= figures["prompt_accuracy"] <= 1


@pytest.mark.parametrize(("argv", "param"), [
    (["train", "--task", "video", "--text-training", "full"], "text_training"),
    (["train", "--task", "video", "--decoder-adapt-steps", "3"], "decoder_adapt_steps"),
    (["train", "--task", "image", "--noise-draws", "2"], "noise_draws"),
    (["train", "--task", "edit", "--vae-crop", "32"], "vae_crop"),
    (["train", "--task", "video", "--frames", "8"], "frames"),
    (["train", "--task", "video", "--vae-crop", "60"], "vae_crop"),
    (["eval", "--task", "video", "--lora", "some-folder"], "lora"),
    (["eval", "--task", "video"], "model"),
])
def test_cli_refuses_what_video_training_and_eval_do_not_take(argv, param, tmp_path):
    if argv[0] == "train":
        argv = [*argv, "--run-dir", str(tmp_path / "run"), "--output", str(tmp_path / "out")]
    with pytest.raises(InvalidParameterError) as error:
        main(argv)
    assert error.value.param == param


def test_init_from_keeps_the_folder_s_trained_parts_and_runs_no_stage_of_theirs(trained, tmp_path):
    """--init-from a video folder: its tokenizer, text encoder and VAE come back unchanged (no VAE or parsing
    stage runs), its transformer too; a folder with no transformer starts a fresh one; one without a VAE is
    refused, naming init_from."""
    import shutil

    from ditserve.demo.video_model import video_pipeline_from

    _, source = trained
    run_dir = tmp_path / "run"
    main(["train", "--task", "video", "--init-from", str(source), "--run-dir", str(run_dir), "--output",
          str(tmp_path / "out"), "--steps", "0", "--device", "cpu"])
    assert {r["stage"] for r in _log(run_dir)} == {"done"}
    before, after = video_pipeline_from(source), WanPipeline.from_pretrained(str(tmp_path / "out"))
    for name in ("vae", "text_encoder", "transformer"):
        for (key, value), (_, kept) in zip(getattr(before, name).state_dict().items(),
                                           getattr(after, name).state_dict().items(), strict=True):
            assert torch.equal(value, kept), (name, key)
    assert after.vae.config.latents_std == before.vae.config.latents_std
    parts = tmp_path / "parts"
    for name in ("tokenizer", "text_encoder", "vae"):
        shutil.copytree(source / name, parts / name)
    fresh = video_pipeline_from(parts).transformer
    assert not torch.equal(fresh.proj_out.weight, before.transformer.proj_out.weight)
    shutil.rmtree(parts / "vae")
    with pytest.raises(InvalidParameterError, match="no vae folder") as error:
        video_pipeline_from(parts)
    assert error.value.param == "init_from"
