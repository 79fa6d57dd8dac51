"""LTX-2 text-to-video (LTX2Pipeline): one transformer denoises a video and its sound track together.

Each step the transformer reads the video's latent tokens and the audio's (with per-modality text embeddings made
by the Gemma3 encoder and the text connectors) and answers a velocity for each; each stream is stepped by its own
copy of the flow-matching scheduler, as diffusers does. A request's latents are its two streams joined per row
(``JointLatents``), so the engine batches, pauses and steps them as one tensor.

Guidance is diffusers': every term is formed on the predicted clean latents (x0) of each stream, then turned back
into a velocity: classifier-free guidance (``guidance_scale`` for the video; the audio's scale is the pipeline's
``audio_guidance_scale``, whose default 7 makes the unconditional pass run whatever ``guidance_scale`` is),
spatio-temporal guidance (a pass with the self-attention of some blocks perturbed), modality isolation (a pass with
the audio-video cross-attention off) and guidance rescale. The terms other than ``guidance_scale`` keep the
pipeline's ``__call__`` defaults (``LTX2Guidance``): the sampling params have no fields for them.
``fps`` is the pipeline's ``frame_rate``: the audio's length and the video's positional embeddings follow it.
``num_frames`` defaults to 121 (diffusers' default for checkpoints without a duration head; LTX-2.5's predicted
duration is not offered). Output: one uint8 video per output with its sound track (``RequestOutput.audio``).
"""

from __future__ import annotations

import enum
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.ltx2.pipeline_ltx2 import rescale_noise_cfg
from diffusers.pipelines.ltx2.utils import conditioning_frame_rate
from diffusers.utils.torch_utils import randn_tensor

from ditserve.errors import InvalidParameterError
from ditserve.models.base import (
    LoopAdapter,
    ModelKind,
    RequestMedia,
    RequestState,
    StepBatch,
    request_generator,
    stack_rows,
)
from ditserve.models.common import check_num_frames, flow_match_shift, fresh_scheduler, to_uint8_video
from ditserve.request import AudioTrack, Request

#: diffusers' frame count for checkpoints without a duration head
DEFAULT_NUM_FRAMES = 121


class Branch(enum.Enum):
    """The transformer passes of one step (the value is the branch label caches key their state on)."""

    COND = "cond"
    UNCOND = "uncond"
    #: spatio-temporal guidance: the positive prompt with self-attention perturbed at the STG blocks
    STG = "stg"
    #: modality isolation: the positive prompt with the audio-video cross-attention off
    MODALITY = "modality"


@dataclass(frozen=True)
class LTX2Guidance:
    """The pipeline's ``__call__`` defaults that a request cannot set (read from diffusers, so they follow it)."""

    stg_scale: float
    modality_scale: float
    guidance_rescale: float
    #: None or 0: the video's value (diffusers' ``or``)
    audio_guidance_scale: float | None
    audio_stg_scale: float | None
    audio_modality_scale: float | None
    audio_guidance_rescale: float | None
    stg_blocks: tuple[int, ...]
    use_cross_timestep: bool
    motion_speed: float
    decode_timestep: float

    @classmethod
    def of(cls, pipeline: Any) -> LTX2Guidance:
        defaults = {name: p.default for name, p in inspect.signature(type(pipeline).__call__).parameters.items()}
        return cls(
            stg_scale=defaults["stg_scale"], modality_scale=defaults["modality_scale"],
            guidance_rescale=defaults["guidance_rescale"], audio_guidance_scale=defaults["audio_guidance_scale"],
            audio_stg_scale=defaults["audio_stg_scale"], audio_modality_scale=defaults["audio_modality_scale"],
            audio_guidance_rescale=defaults["audio_guidance_rescale"],
            stg_blocks=tuple(defaults["spatio_temporal_guidance_blocks"] or ()),
            use_cross_timestep=defaults["use_cross_timestep"], motion_speed=defaults["motion_speed"],
            decode_timestep=defaults["decode_timestep"])


@dataclass(frozen=True)
class StreamScales:
    """One stream's guidance: classifier-free, spatio-temporal, modality isolation, rescale."""

    cfg: float
    stg: float
    modality: float
    rescale: float


@dataclass(frozen=True)
class PromptEmbeds:
    """One prompt through the text encoder and the connectors: the video's and the audio's text, and their mask."""

    video: torch.Tensor
    audio: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class JointLatents:
    """How a request's rows hold its two streams: the packed video tokens, then the packed audio tokens, flattened."""

    video_shape: tuple[int, int]
    audio_shape: tuple[int, int]

    def join(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return torch.cat([video.flatten(1), audio.flatten(1)], dim=1)

    def split(self, joint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        video, audio = joint.split([math.prod(self.video_shape), math.prod(self.audio_shape)], dim=1)
        return video.unflatten(1, self.video_shape), audio.unflatten(1, self.audio_shape)


@dataclass(frozen=True)
class LatentGrid:
    """The latent sizes of a request: video frames x height x width, and audio frames."""

    frames: int
    height: int
    width: int
    audio_frames: int


class LTX2Adapter(LoopAdapter):
    pipeline_class_names = ("LTX2Pipeline",)
    unsupported_params = ("true_cfg_scale", "guidance_scale_2", "boundary_ratio")
    guidance_note = "the audio's guidance, spatio-temporal and modality guidance keep the pipeline's defaults"
    kind = ModelKind.VIDEO

    def __init__(self, pipeline: Any, model_defaults: Any = None) -> None:
        super().__init__(pipeline, model_defaults)
        self.guidance = LTX2Guidance.of(pipeline)

    @property
    def size_multiple(self) -> int:
        # diffusers' check_inputs wants multiples of 32; patchification multiples of VAE factor x patch size
        patch = self.pipeline.transformer.config.patch_size
        return math.lcm(32, self.pipeline.vae_spatial_compression_ratio * patch)

    # ------------------------------------------------------------------ params
    def family_defaults(self) -> dict[str, Any]:
        defaults = {name: p.default for name, p in inspect.signature(type(self.pipeline).__call__).parameters.items()}
        return {"num_inference_steps": defaults["num_inference_steps"], "guidance_scale": defaults["guidance_scale"],
                "max_sequence_length": defaults["max_sequence_length"], "height": defaults["height"],
                "width": defaults["width"], "num_frames": DEFAULT_NUM_FRAMES, "fps": round(defaults["frame_rate"])}

    def validate_params(self, params: Any) -> None:
        super().validate_params(params)
        check_num_frames(params.num_frames, self.pipeline.vae_temporal_compression_ratio)
        if params.negative_prompt is not None and not self._runs_cfg(params.guidance_scale):
            raise InvalidParameterError(
                f"negative_prompt needs guidance_scale > 1 (got {params.guidance_scale}): LTX-2 only runs the "
                "negative branch with classifier-free guidance", param="negative_prompt")

    def step_key(self, request: Request) -> tuple[Any, ...]:
        # the audio's length and the video's positional embeddings follow the frame rate
        return super().step_key(request) + (request.params.fps,)

    def stream_scales(self, params: Any) -> tuple[StreamScales, StreamScales]:
        """The video's and the audio's guidance for a request (diffusers' ``or``: an unset audio value is the
        video's)."""
        g = self.guidance
        video = StreamScales(params.guidance_scale, g.stg_scale, g.modality_scale, g.guidance_rescale)
        audio = StreamScales(g.audio_guidance_scale or video.cfg, g.audio_stg_scale or video.stg,
                             g.audio_modality_scale or video.modality, g.audio_guidance_rescale or video.rescale)
        return video, audio

    def _runs_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 1 or (self.guidance.audio_guidance_scale or guidance_scale) > 1

    def uses_guidance(self, request: Request) -> bool:
        return self._runs_cfg(request.params.guidance_scale)

    @property
    def stg_perturbs(self) -> bool:
        """Whether the STG pass differs from the conditional one: only blocks built with perturbed attention
        (LTX-2.3) can be perturbed, and only blocks that exist. Otherwise it equals the conditional pass (its term
        is zero) and is not run."""
        transformer = self.pipeline.transformer
        blocks = len(transformer.transformer_blocks)
        return bool(transformer.config.perturbed_attn) and any(b < blocks for b in self.guidance.stg_blocks)

    def runs(self, branch: Branch, state: RequestState) -> bool:
        """Whether the request runs ``branch`` (diffusers runs each term for both streams when either uses it)."""
        video, audio = self.stream_scales(state.params)
        if branch is Branch.COND:
            return True
        if branch is Branch.UNCOND:
            return self.uses_guidance(state.request)
        if branch is Branch.STG:
            return self.stg_perturbs and (video.stg > 0 or audio.stg > 0)
        return video.modality > 1 or audio.modality > 1

    # ------------------------------------------------------------------ generation
    def encode_request(self, request: Request) -> dict[Branch, PromptEmbeds]:
        pipe, p = self.pipeline, request.params
        guided = self.uses_guidance(request)
        embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(
            prompt=[request.prompt], negative_prompt=p.negative_prompt, do_classifier_free_guidance=guided,
            num_videos_per_prompt=1, max_sequence_length=p.max_sequence_length, device=self.device)
        if guided:
            # the connectors run on the negative and positive prompts together, as diffusers runs them
            embeds, mask = torch.cat([neg_embeds, embeds]), torch.cat([neg_mask, mask])
        padding_side = getattr(pipe.tokenizer, "padding_side", "left")
        video, audio, text_mask = pipe.connectors(embeds, mask, padding_side=padding_side)
        rows = [PromptEmbeds(v.to(self.dtype), a.to(self.dtype), m)
                for v, a, m in zip(video.split(1), audio.split(1), text_mask.split(1), strict=True)]
        return {Branch.COND: rows[-1], Branch.UNCOND: rows[0]} if guided else {Branch.COND: rows[0]}

    def latent_grid(self, params: Any) -> LatentGrid:
        pipe = self.pipeline
        # the audio lasts as long as the video plays: num_frames at fps
        audio_per_second = pipe.audio_sampling_rate / pipe.audio_hop_length / pipe.audio_vae_temporal_compression_ratio
        return LatentGrid(frames=(params.num_frames - 1) // pipe.vae_temporal_compression_ratio + 1,
                          height=params.height // pipe.vae_spatial_compression_ratio,
                          width=params.width // pipe.vae_spatial_compression_ratio,
                          audio_frames=round(params.num_frames / params.fps * audio_per_second))

    def initial_video_latents(self, request: Request, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        """The request's packed video noise, and what else conditions it (nothing for text-to-video)."""
        pipe, p = self.pipeline, request.params
        latents = pipe.prepare_latents(request.num_outputs, pipe.transformer.config.in_channels, p.height, p.width,
                                       p.num_frames, 0.0, torch.float32, self.device, generator)
        return latents, {}

    def prepare(self, request: Request, embeddings: dict[Branch, PromptEmbeds]) -> RequestState:
        pipe, p = self.pipeline, request.params
        grid = self.latent_grid(p)
        # one generator draws the video noise, then the audio noise, then (a VAE with timestep conditioning) the
        # decode noise, as diffusers' does
        generator = request_generator(request)
        video, extras = self.initial_video_latents(request, generator)
        audio_vae = pipe.audio_vae
        audio = pipe.prepare_audio_latents(
            request.num_outputs, num_channels_latents=audio_vae.config.latent_channels,
            audio_latent_length=grid.audio_frames, num_mel_bins=audio_vae.config.mel_bins, noise_scale=0.0,
            dtype=torch.float32, device=self.device, generator=generator)
        sigmas = np.linspace(1.0, 1 / p.num_inference_steps, p.num_inference_steps)
        schedulers = []
        for _ in range(2):
            scheduler = fresh_scheduler(pipe, p.flow_shift)
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=flow_match_shift(pipe, video.shape[1]))
            scheduler.set_begin_index(0)
            schedulers.append(scheduler)
        fps = conditioning_frame_rate(float(p.fps), self.guidance.motion_speed)
        transformer = pipe.transformer
        coords = (transformer.rope.prepare_video_coords(request.num_outputs, grid.frames, grid.height, grid.width,
                                                        self.device, fps=fps),
                  transformer.audio_rope.prepare_audio_coords(request.num_outputs, grid.audio_frames, self.device))
        layout = JointLatents(tuple(video.shape[1:]), tuple(audio.shape[1:]))
        conditioning = {"embeds": embeddings, "layout": layout, "grid": grid, "audio_scheduler": schedulers[1],
                        "coords": coords, "fps": fps, "generator": generator, **extras}
        return RequestState(request=request, latents=layout.join(video, audio), scheduler=schedulers[0],
                            timesteps=schedulers[0].timesteps, conditioning=conditioning)

    def video_timestep(self, batch: StepBatch, states: Sequence[RequestState]) -> torch.Tensor:
        """The transformer's video timestep for these requests' rows: one per row (text-to-video)."""
        return batch.timesteps(states)

    def _call(self, batch: StepBatch, branch: Branch, states: Sequence[RequestState]) -> tuple[torch.Tensor, ...]:
        transformer = self.pipeline.transformer
        text_branch = Branch.UNCOND if branch is Branch.UNCOND else Branch.COND

        def stacked_text() -> tuple[torch.Tensor, ...]:
            embeds = [s.conditioning["embeds"][text_branch] for s in states]
            return tuple(stack_rows([getattr(e, name) for e in embeds], states) for name in ("video", "audio", "mask"))

        def stacked_coords() -> tuple[torch.Tensor, ...]:
            return tuple(torch.cat([s.conditioning["coords"][k] for s in states]) for k in range(2))

        video_text, audio_text, mask = batch.remember(("text", text_branch), states, stacked_text)
        video_coords, audio_coords = batch.remember("coords", states, stacked_coords)
        streams = [s.conditioning["layout"].split(s.latents) for s in states]
        video = torch.cat([v for v, _ in streams]).to(transformer.dtype)
        audio = torch.cat([a for _, a in streams]).to(transformer.dtype)
        timesteps = batch.timesteps(states)
        grid, first = states[0].conditioning["grid"], states[0]
        return batch.call(
            branch.value, states, hidden_states=video, audio_hidden_states=audio, encoder_hidden_states=video_text,
            audio_encoder_hidden_states=audio_text, timestep=self.video_timestep(batch, states),
            audio_timestep=timesteps, sigma=timesteps, encoder_attention_mask=mask, audio_encoder_attention_mask=mask,
            num_frames=grid.frames, height=grid.height, width=grid.width, fps=first.conditioning["fps"],
            audio_num_frames=grid.audio_frames, video_coords=video_coords, audio_coords=audio_coords,
            isolate_modalities=branch is Branch.MODALITY,
            spatio_temporal_guidance_blocks=list(self.guidance.stg_blocks) if branch is Branch.STG else None,
            use_cross_timestep=self.guidance.use_cross_timestep)

    def predict(self, batch: StepBatch) -> torch.Tensor:
        # each request's rows of each pass it runs: branch -> request id -> (video, audio) predictions
        passes: dict[Branch, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for branch in Branch:
            members = [s for s in batch.states if self.runs(branch, s)]
            if not members:
                continue
            video, audio = self._call(batch, branch, members)
            sizes = [s.num_rows for s in members]
            passes[branch] = {s.request_id: (v, a) for s, v, a in
                              zip(members, video.float().split(sizes), audio.float().split(sizes), strict=True)}
        return torch.cat([self._guided_velocity(s, {b: rows[s.request_id] for b, rows in passes.items()
                                                    if s.request_id in rows}) for s in batch.states])

    def _guided_velocity(self, state: RequestState, passes: dict[Branch, tuple[torch.Tensor, torch.Tensor]]
                         ) -> torch.Tensor:
        """The request's guided velocity of both streams, joined: guidance is formed on x0, as diffusers does."""
        samples = state.conditioning["layout"].split(state.latents)
        schedulers = (state.scheduler, state.conditioning["audio_scheduler"])
        velocities = []
        for stream, (sample, scheduler, scales) in enumerate(
                zip(samples, schedulers, self.stream_scales(state.params), strict=True)):
            sigma = scheduler.sigmas[state.step_index]
            x0 = {branch: sample - predictions[stream] * sigma for branch, predictions in passes.items()}
            velocities.append((sample - guided_x0(x0, scales)) / sigma)
        return state.conditioning["layout"].join(*velocities)

    def scheduler_step(self, state: RequestState, model_output: torch.Tensor) -> torch.Tensor:
        layout = state.conditioning["layout"]
        video, audio = layout.split(state.latents)
        video_velocity, audio_velocity = layout.split(model_output)
        video = self.step_video(state, video, state.scheduler.step(video_velocity, state.t, video, return_dict=False)[0])
        audio = state.conditioning["audio_scheduler"].step(audio_velocity, state.t, audio, return_dict=False)[0]
        return layout.join(video, audio)

    def step_video(self, state: RequestState, before: torch.Tensor, stepped: torch.Tensor) -> torch.Tensor:
        """The video tokens after the step: all of them move (text-to-video)."""
        return stepped

    # ------------------------------------------------------------------ decoding
    def decode(self, state: RequestState) -> RequestMedia:
        pipe, grid = self.pipeline, state.conditioning["grid"]
        vae = pipe.vae
        video, _ = state.conditioning["layout"].split(state.latents)
        transformer = pipe.transformer
        latents = pipe._unpack_latents(video, grid.frames, grid.height, grid.width, transformer.config.patch_size,
                                       transformer.config.patch_size_t).to(self.dtype)
        timestep = None
        if vae.config.timestep_conditioning:
            # diffusers mixes decode noise from the request's generator in at the decode timestep (0 by default)
            noise = randn_tensor(latents.shape, generator=state.conditioning["generator"], device=latents.device,
                                 dtype=latents.dtype)
            scale = self.guidance.decode_timestep
            timestep = torch.tensor([scale], device=latents.device, dtype=latents.dtype)
            latents = (1 - scale) * latents + scale * noise
        latents = pipe._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        decoded = vae.decode(latents.to(vae.dtype), timestep, return_dict=False)[0]
        videos = pipe.video_processor.postprocess_video(decoded, output_type="np")
        return [to_uint8_video(v) for v in videos]

    def decode_audio(self, state: RequestState) -> list[AudioTrack]:
        pipe, grid = self.pipeline, state.conditioning["grid"]
        audio_vae = pipe.audio_vae
        _, audio = state.conditioning["layout"].split(state.latents)
        audio = pipe._denormalize_audio_latents(audio, audio_vae.latents_mean, audio_vae.latents_std)
        mel_bins = audio_vae.config.mel_bins // pipe.audio_vae_mel_compression_ratio
        audio = pipe._unpack_audio_latents(audio, grid.audio_frames, num_mel_bins=mel_bins)
        spectrograms = audio_vae.decode(audio.to(audio_vae.dtype), return_dict=False)[0]
        waveforms = pipe.vocoder(spectrograms).float().cpu().numpy()
        rate = pipe.vocoder.config.output_sampling_rate
        return [AudioTrack(samples=w, sample_rate=rate) for w in waveforms]


def guided_x0(x0: dict[Branch, torch.Tensor], scales: StreamScales) -> torch.Tensor:
    """The guided clean latents of one stream from each pass's x0, summed in diffusers' order."""
    cond = x0[Branch.COND]
    cfg = (scales.cfg - 1) * (cond - x0[Branch.UNCOND]) if Branch.UNCOND in x0 else 0
    stg = scales.stg * (cond - x0[Branch.STG]) if Branch.STG in x0 else 0
    modality = (scales.modality - 1) * (cond - x0[Branch.MODALITY]) if Branch.MODALITY in x0 else 0
    guided = cond + cfg + stg + modality
    return rescale_noise_cfg(guided, cond, guidance_rescale=scales.rescale) if scales.rescale > 0 else guided
