import numpy as np
import pytest
import torch

from ditserve.demo.checker import find_region, label_image
from ditserve.demo.language import Scene
from ditserve.demo.render import MAX_JITTER, render
from ditserve.demo.video_checker import evaluate_clips, frame_labels, score_clip
from ditserve.demo.video_language import Clip, ClipKind, event_onset, parse_video_prompt, sample_clips
from ditserve.demo.video_render import clip_layout, render_clip, render_clip_batch, to_pil_frames
from ditserve.errors import InvalidParameterError

FRAMES = 9
PROMPTS = {
    ClipKind.MOTION: "a large red triangle moves from the top left to the bottom right and a small green circle at "
                     "the top right on a black background",
    ClipKind.APPEAR: "a small yellow square appears on the right and a large purple circle on the left",
    ClipKind.COLOR_CHANGE: "a large orange circle at the bottom turns blue on a white background",
}


def _jittered(clips: list[Clip], seed: int = 0) -> torch.Tensor:
    return render_clip_batch(clips, FRAMES, jitter=MAX_JITTER, generator=torch.Generator().manual_seed(seed))


def _still_frames(clip: Clip, *objects) -> list:
    """A clip in which nothing happens: the picture of ``objects`` (None: left out) in every frame."""
    scene = Scene(objects=tuple(o for o in objects if o is not None), background=clip.background)
    return [render(scene)] * FRAMES


def test_renderer_shapes_ranges_and_frames_as_the_image_renderer_draws_them():
    clips = [parse_video_prompt(prompt) for prompt in PROMPTS.values()]
    videos = render_clip_batch(clips, FRAMES)
    assert videos.shape == (3, 3, FRAMES, 128, 128) and videos.dtype == torch.float32
    assert videos.min() >= 0 and videos.max() <= 1
    change = clips[2]
    first = render(Scene((change.first,), change.background))
    last = render(Scene((change.last,), change.background))
    frames = to_pil_frames(videos)[2]
    assert len(frames) == FRAMES and frames[0].size == (128, 128)
    onset = event_onset(FRAMES)
    assert all(np.array_equal(frame, first) for frame in frames[:onset])
    assert all(np.array_equal(frame, last) for frame in frames[onset:])
    assert np.array_equal(render_clip(PROMPTS[ClipKind.MOTION], FRAMES)[4], to_pil_frames(videos)[0][4])


def test_a_moving_object_is_drawn_at_its_interpolated_centre():
    clip = parse_video_prompt("a small red square moves from the left to the right")
    labels = frame_labels(render_clip(clip, FRAMES))
    centres = [find_region(frame, "red", (0.5, 0.5), 0.5).center for frame in labels]
    for index, (x, y) in enumerate(centres):
        assert x == pytest.approx(1 / 6 + index / (FRAMES - 1) * 2 / 3, abs=1 / 128)
        assert y == pytest.approx(0.5, abs=1 / 128)


def test_jitter_is_one_offset_per_object_for_the_whole_clip():
    clips = sample_clips(6, seed=3, split="all")
    plain = clip_layout(clips, FRAMES)
    jittered = clip_layout(clips, FRAMES, jitter=MAX_JITTER, generator=torch.Generator().manual_seed(0))
    offsets = (jittered.center - plain.center).view(len(clips), FRAMES, -1, 2)
    assert torch.allclose(offsets, offsets[:, :1].expand_as(offsets), atol=1e-6)
    assert offsets.abs().max() <= MAX_JITTER + 1e-6 and offsets[:, 0, :2].abs().min() > 0
    with pytest.raises(InvalidParameterError, match="jitter"):
        clip_layout(clips, FRAMES, jitter=0.5)


def test_only_first_lays_out_each_clip_s_first_frame_with_the_clip_s_jitter():
    clips = sample_clips(6, seed=3, split="all")
    full = clip_layout(clips, FRAMES, jitter=MAX_JITTER, generator=torch.Generator().manual_seed(0))
    first = clip_layout(clips, FRAMES, jitter=MAX_JITTER, generator=torch.Generator().manual_seed(0), only_first=True)
    for name in ("center", "half", "size", "shape", "color", "present", "background"):
        assert torch.equal(getattr(first, name), getattr(full, name)[::FRAMES]), name


def test_rendered_ground_truth_passes_the_checker():
    clips = sample_clips(36, seed=2, split="all")
    with_jitter = evaluate_clips(_jittered(clips), clips)
    assert with_jitter["prompt_accuracy"] >= 0.97 and with_jitter["object_accuracy"] >= 0.99
    assert all(with_jitter[f"{kind.value}_clips"] >= 6 for kind in ClipKind)
    # without jitter, every figure is perfect, at the longest clip length too
    longer = sample_clips(12, seed=3, split="all")
    without_jitter = evaluate_clips(render_clip_batch(longer, 17), longer)
    for figure in ("object_accuracy", "frame_accuracy", "event_accuracy", "motion_direction_accuracy",
                   "prompt_accuracy", *(f"{kind.value}_pass_rate" for kind in ClipKind)):
        assert without_jitter[figure] == 1.0, figure


@pytest.mark.parametrize("kind", list(ClipKind))
def test_a_clip_in_which_nothing_happens_fails(kind):
    clip = parse_video_prompt(PROMPTS[kind])
    assert score_clip(_jittered([clip])[0], clip).correct
    subject_before = clip.first if kind is not ClipKind.APPEAR else None
    for frames in (_still_frames(clip, subject_before, clip.still), _still_frames(clip, clip.last, clip.still)):
        verdict = score_clip(frames, clip)
        assert not verdict.event_ok and not verdict.correct


def test_reversed_motion_fails_on_its_direction():
    clip = parse_video_prompt(PROMPTS[ClipKind.MOTION])
    reversed_clip = Clip(clip.last, clip.first, clip.still, clip.background)
    verdict = score_clip(_jittered([reversed_clip])[0], clip)
    assert not verdict.event_ok and not verdict.correct
    assert evaluate_clips(_jittered([reversed_clip]), [clip])["motion_direction_accuracy"] == 0.0


def test_a_jump_has_the_right_direction_but_wrong_frames():
    clip = parse_video_prompt("a small red square moves from the left to the right")
    jump = [*render_clip(clip, FRAMES)[:1]] * 4 + [*render_clip(clip, FRAMES)[-1:]] * (FRAMES - 4)
    verdict = score_clip(jump, clip)
    assert verdict.event_ok and not verdict.correct
    wrong = [frame.correct for frame in verdict.frames]
    assert wrong[0] and wrong[-1] and not all(wrong[1:-1])


def test_wrong_clips_fail_at_every_kind():
    clips = sample_clips(30, seed=8, split="all")
    wrong = []
    for clip in clips:
        if clip.kind is ClipKind.MOTION:
            wrong.append(_jittered([Clip(clip.last, clip.first, clip.still, clip.background)])[0])
        elif clip.kind is ClipKind.APPEAR:
            wrong.append(_still_frames(clip, clip.still))  # never appears
        else:
            wrong.append(_still_frames(clip, clip.first, clip.still))  # never changes colour
    figures = evaluate_clips(wrong, clips)
    assert figures["prompt_accuracy"] == 0.0 and figures["event_accuracy"] == 0.0
    assert all(figures[f"{kind.value}_clips"] > 0 for kind in ClipKind)


def test_every_form_of_frames_reads_the_same():
    clip = parse_video_prompt(PROMPTS[ClipKind.APPEAR])
    video = _jittered([clip], seed=5)[0]
    pictures = to_pil_frames(video[None])[0]
    expected = score_clip(pictures, clip)
    uint8_frames = np.stack([np.asarray(picture) for picture in pictures])
    for form in (video, video.permute(1, 2, 3, 0), uint8_frames, uint8_frames.transpose(3, 0, 1, 2),
                 list(video.transpose(0, 1)), list(uint8_frames)):
        assert score_clip(form, clip) == expected
    # labelling each distinct colour once gives every pixel the shapes checker's label
    noisy = np.clip(uint8_frames.astype(int) + np.random.default_rng(0).integers(-40, 40, uint8_frames.shape), 0, 255)
    labels = frame_labels(noisy.astype(np.uint8))
    assert all(np.array_equal(labels[i], label_image(noisy[i].astype(np.uint8))) for i in range(FRAMES))


def test_bad_input_is_refused_naming_the_field():
    clip = parse_video_prompt(PROMPTS[ClipKind.APPEAR])
    pictures = render_clip(clip, FRAMES)
    cases = [
        (lambda: score_clip(pictures[:1], clip), "frames"),
        (lambda: score_clip(torch.zeros(3, FRAMES, 64, 32), clip), "frames"),
        (lambda: score_clip(torch.zeros(FRAMES, 64, 64), clip), "frames"),
        (lambda: score_clip(["not a picture"] * FRAMES, clip), "frames"),
        (lambda: score_clip(pictures, PROMPTS[ClipKind.APPEAR]), "clip"),
        (lambda: evaluate_clips([pictures], [clip, clip]), "clips_frames"),
        (lambda: evaluate_clips([], []), "clips"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidParameterError) as error:
            call()
        assert error.value.param == field
