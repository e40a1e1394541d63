"""Load a checkpoint into our networks, and turn prompts into images.

Modules are built on the meta device and receive the checkpoint's tensors with
`load_state_dict(strict=True, assign=True)`: no random initialisation that is then overwritten,
no second copy of the weights.

Prompts become conditioning in `text_conditioning.py`; `guidance_conditioning` shapes it for the U-Net.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ldmcli.detect import ModelSpec, detect_spec
from ldmcli.device import dtype_name, return_freed_memory
from ldmcli.errors import CheckpointError, NonFiniteError, name_keys
from ldmcli.layout import Components, read_components
from ldmcli.models.clip import CLIPTextModel
from ldmcli.models.unet import UNetModel
from ldmcli.models.vae import AutoencoderKL
from ldmcli.request import ImageRequest
from ldmcli.text_conditioning import TextConditioning
from ldmcli.tokenizer import PromptTokenizer

if TYPE_CHECKING:
    from ldmcli.denoiser import CFGDenoiser
    from ldmcli.embeddings import EmbeddingLibrary
    from ldmcli.lora_uses import LoraUse
    from ldmcli.models.taesd import TinyAutoencoder
    from ldmcli.taesd_file import TaesdFile
    from ldmcli.vae_file import VaeFile


@dataclass
class StableDiffusion:
    """A loaded model: spec, tokenizer and the three networks, on one device."""

    spec: ModelSpec
    path: Path
    tokenizer: PromptTokenizer | None  # None: the SDXL refiner (bigG only, `tokenizer_2`)
    text_encoder: CLIPTextModel | None  # None once released (`text_conditioning.encode_up_front`)
    unet: UNetModel | None  # None once released (`release_unet`)
    vae: AutoencoderKL
    device: torch.device
    dtype: torch.dtype
    hash: str | None = None  # A1111's short file hash, filled in by whoever needs it (hashing costs seconds)
    tokenizer_2: PromptTokenizer | None = None  # SDXL: OpenCLIP bigG's tokenizer (pads with 0)
    text_encoder_2: CLIPTextModel | None = None  # SDXL: OpenCLIP bigG
    # Things that happened while generating that the user should hear about (e.g. a VAE decode
    # redone in fp32). The caller prints and clears them.
    warnings: list[str] = field(default_factory=list)
    # (texts, clip skip) -> their text conditioning, for texts encoded before the text encoders were
    # released (`text_conditioning.encode_up_front`); `encode_texts` looks here first.
    text_cache: dict[tuple[tuple[str, ...], int], TextConditioning] = field(default_factory=dict)
    # What the user added to the checkpoint: textual-inversion embeddings a prompt may name, a VAE file
    # in place of the checkpoint's own, the LoRAs merged into the weights (`load`).
    embeddings: EmbeddingLibrary | None = None
    vae_file: VaeFile | None = None
    # A tiny autoencoder (`--taesd`) that decodes in place of `vae`; `vae` still encodes input images.
    taesd_file: TaesdFile | None = None
    tiny_vae: TinyAutoencoder | None = None
    loras: tuple[LoraUse, ...] = ()
    notes: list[str] = field(default_factory=list)  # what loading has to say (a VAE of another family, ...)
    # SDXL refiners that finish this model's images (`refiner.py`), by the name a request gives them
    refiners: dict[str, StableDiffusion] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name


def load(
    path: Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prediction: str | None = None,
    vae: Path | None = None,
    taesd: Path | None = None,
    loras: Sequence[LoraUse] = (),
    embedding_dirs: Sequence[Path] = (),
    embedding_files: Mapping[str, Path] | None = None,
) -> StableDiffusion:
    """Read, detect and load a single file or diffusers folder.

    prediction: "epsilon"/"eps" or "v_prediction"/"v" overrides what the checkpoint says or what
    detection guesses (`spec.prediction_source` says which happened; `spec.notes` explains guesses).
    vae: a VAE file or folder used instead of the checkpoint's own (`vae_file`).
    taesd: a tiny autoencoder (`taesd_file`) that decodes instead of the VAE, which still encodes.
    loras: merged into the weights before they are built (`lora.apply_loras`): all are read and checked
        against the model first, so a LoRA that does not fit fails the load, never half-merged.
    embedding_dirs: folders of textual-inversion embeddings that prompts may name (`embeddings`).
    embedding_files: names that call a given file whatever its name (an image's embeddings found by hash).
    """
    from ldmcli.embeddings import EmbeddingLibrary, widths_of
    from ldmcli.lora import apply_loras, read_lora
    from ldmcli.taesd_file import fit_taesd, read_taesd
    from ldmcli.vae_file import read_vae, replace_vae

    # Cast while reading, so the process never holds the file's dtype and the compute dtype at once.
    # Not to fp16: SDXL's VAE must then stay fp32, and fp32 -> fp16 -> fp32 would lose its precision.
    read_dtype = dtype if torch.device(device).type == "cpu" and dtype != torch.float16 else None
    # A TAESD is a few MB: read before the checkpoint, so a file that is not one fails fast.
    taesd_file = None if taesd is None else read_taesd(Path(taesd), dtype=read_dtype)
    components = read_components(Path(path), dtype=read_dtype)
    notes, vae_file = [], None
    if vae is not None:
        vae_file = read_vae(Path(vae), dtype=read_dtype)
        notes += replace_vae(components, vae_file)
    if loras:
        apply_loras(components, [(read_lora(use.path), use.te_weight, use.unet_weight) for use in loras])
        return_freed_memory()  # the factors read while merging, before sampling needs the room
    model = load_components(components, device=torch.device(device), dtype=dtype, prediction=prediction)
    model.vae_file, model.loras, model.notes = vae_file, tuple(loras), notes
    if taesd_file is not None:
        notes += fit_taesd(model, taesd_file)
        model.taesd_file, model.tiny_vae = taesd_file, taesd_file.build(model.device, model.dtype)
    if (embedding_dirs or embedding_files) and model.spec.text_encoder is None:
        notes.append("textual-inversion embeddings are not used with the SDXL refiner yet: its prompts' words stay words")
    elif embedding_dirs or embedding_files:
        model.embeddings = library = EmbeddingLibrary.from_dir(*embedding_dirs, widths=widths_of(model.spec))
        # first: where names tie (the same tokens, another case), the earlier entry wins
        library.files = {**(embedding_files or {}), **{k: v for k, v in library.files.items() if k not in (embedding_files or {})}}
    return model


def load_components(
    components: Components, *, device: torch.device, dtype: torch.dtype, prediction: str | None = None
) -> StableDiffusion:
    spec = detect_spec(components, prediction=prediction)
    # SDXL's VAE overflows in fp16 (black or NaN images): keep it in fp32 unless the folder says it is safe.
    vae_dtype = torch.float32 if dtype == torch.float16 and spec.vae_fp16_unsafe else dtype
    path = components.path
    text = spec.text_encoder  # None: the SDXL refiner, whose one text encoder (bigG) is text_encoder_2
    model = StableDiffusion(
        spec=spec,
        path=path,
        tokenizer=None if text is None else _tokenizer(components.tokenizer_dir, spec.pad_token_id, text.vocab_size),
        text_encoder=None if text is None else _build(CLIPTextModel, text, components.text_encoder, "text encoder", path,
                                                      device, dtype),
        unet=_build(UNetModel, spec.unet, components.unet, "U-Net", path, device, dtype),
        vae=_build(AutoencoderKL, spec.vae, components.vae, "VAE", path, device, vae_dtype),
        device=device,
        dtype=dtype,
    )
    if spec.text_encoder_2 is not None:
        assert components.text_encoder_2 is not None and spec.pad_token_id_2 is not None
        model.tokenizer_2 = _tokenizer(components.tokenizer_2_dir, spec.pad_token_id_2, spec.text_encoder_2.vocab_size)
        model.text_encoder_2 = _build(
            CLIPTextModel, spec.text_encoder_2, components.text_encoder_2, "text encoder 2", path, device, dtype
        )
    return model


def _tokenizer(folder: Path | None, pad_token_id: int, table_rows: int) -> PromptTokenizer:
    """The tokenizer of a text encoder whose embedding table has `table_rows` rows, refused if it
    could produce an id beyond the table (an IndexError mid-run otherwise)."""
    tokenizer = PromptTokenizer(folder, pad_token_id=pad_token_id)
    if tokenizer.largest_id >= table_rows:
        raise CheckpointError(
            f"{tokenizer.source}: the vocabulary has id {tokenizer.largest_id}; the text encoder has {table_rows} tokens"
        )
    return tokenizer


def optimize(model: StableDiffusion, *, compile: bool = False, pack_unet: bool = True) -> list[str]:
    """Make a loaded model fast on its device, in place (`optimize.prepare_for_inference`): fused,
    packed oneDNN layers on CPU, channels_last, optionally torch.compile. Returns what was done.

    pack_unet False: the U-Net gets channels_last only, for runs too short to pay for packing it
    (`run.packing_pays`). The networks are inference-only afterwards (packed CPU layers cannot be moved,
    cast or trained).
    """
    from ldmcli.optimize import prepare_for_inference

    parts = {"unet": model.unet, "vae": model.vae}
    if not pack_unet and not compile:
        prepare_for_inference({"unet": model.unet}, model.device, model.dtype, fuse=False)
        del parts["unet"]
    notes = prepare_for_inference(parts, model.device, model.dtype, compile=compile)
    model.unet, model.vae = parts.get("unet", model.unet), parts["vae"]
    if "unet" not in parts:
        notes.append("U-Net left unpacked (too few U-Net calls in this run to pay for packing)")
    return notes


# The torch.nn.init functions layers call from reset_parameters(). Every tensor is replaced by the
# checkpoint's, so initialising is wasted work, and on the meta device the first random init costs
# ~2 s of one-time decomposition setup (measured: half of loading SD1.5 apart from reading the file).
_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "trunc_normal_", "zeros_", "ones_", "constant_")


@contextmanager
def _without_weight_init():
    """Make torch.nn.init's in-place initialisers no-ops while networks are built for loading."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _build(cls: type[nn.Module], config, tensors: dict, what: str, path: Path, device, dtype) -> nn.Module:
    """Build on meta, adopt the checkpoint's tensors strictly, then move and cast once.

    Keys, shapes and dtypes are compared with the module first, so a file that does not fit is refused
    naming the tensor (load_state_dict would report every mismatch over many lines, or, for a tensor
    that cannot be a parameter, an error about gradients).
    """
    try:
        with torch.device("meta"), _without_weight_init():
            module = cls(config)
    except (ValueError, TypeError, ArithmeticError) as exc:  # a config.json's head count, say
        raise CheckpointError(f"{path}: {what}: cannot build the detected architecture ({exc})") from exc
    expected = module.state_dict()
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {name_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected {name_keys(unexpected)}")
        raise CheckpointError(f"{path}: {what} keys do not match the detected architecture: {'; '.join(parts)}")
    misfits = sorted(k for k in expected if tuple(tensors[k].shape) != tuple(expected[k].shape))
    if misfits:
        key, more = misfits[0], len(misfits) - 1
        raise CheckpointError(
            f"{path}: {what}: {key} has shape {list(tensors[key].shape)}, the detected architecture expects "
            f"{list(expected[key].shape)}" + (f" (and {more} more tensor{'s' * (more > 1)} differ)" if more else "")
        )
    integral = sorted(k for k, t in tensors.items() if not t.is_floating_point())
    if integral:
        raise CheckpointError(f"{path}: {what}: {integral[0]} has dtype {str(tensors[integral[0]].dtype).removeprefix('torch.')}; "
                              "network weights are floating point")
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:  # anything the checks above did not foresee
        raise CheckpointError(f"{path}: {what}: {str(exc).splitlines()[-1].strip()}") from exc
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


@torch.inference_mode()
def unet_conditioning(model: StableDiffusion, text: TextConditioning, batch: int, height: int, width: int,
                      *, negative: bool = False) -> dict[str, torch.Tensor]:
    """The U-Net's keyword arguments for one row of text conditioning, repeated `batch` times:
    {"context"} or, for SDXL, {"context", "y"} (y: the pooled vector and the size sinusoids; the refiner's
    ends with the aesthetic score of the prompt, or with `negative` of the negative prompt)."""
    from ldmcli.conditioning import vector_conditioning

    context = text.context.expand(batch, -1, -1)
    if text.pooled is None:
        return {"context": context}
    pooled = text.pooled.expand(batch, -1)
    return {"context": context, "y": vector_conditioning(model.spec, pooled, height, width, negative=negative)}


def guidance_conditioning(model: StableDiffusion, request: ImageRequest, batch: int):
    """(cond, uncond) for `request` as `ConditioningSchedule`s (uncond None without guidance).

    Each is the prompt's A1111 schedule (`text_conditioning.request_conditioning`). With
    `request.pad_conds` every entry is padded to the longest with empty chunks, so the unconditional
    and conditional passes go through the U-Net as one batch; without, entries keep their lengths and
    `CFGDenoiser` runs the two passes apart when they differ (A1111's default).
    """
    from ldmcli.denoiser import ConditioningSchedule
    from ldmcli.text_conditioning import encode_texts, request_conditioning

    cond, uncond = request_conditioning(model, request)
    entries = cond + (uncond or [])
    tokens = max(text.context.shape[1] for _, text in entries)
    empty = None
    if request.pad_conds and any(text.context.shape[1] != tokens for _, text in entries):
        empty = encode_texts(model, ("",), request.clip_skip)

    # An LCM-distilled U-Net takes the guidance scale as an input (its `timestep_cond`) and is never run
    # under classifier-free guidance: no unconditional pass (diffusers' LatentConsistencyModelPipeline).
    embedded = {}
    if model.spec.embedded_guidance:
        from ldmcli.lcm import embedded_guidance

        embedded = embedded_guidance(request.cfg_scale, batch, model.spec.unet.time_cond_proj_dim)
        uncond = None

    def schedule(entries, negative=False):
        return ConditioningSchedule([
            (end, {**unet_conditioning(model, text if empty is None else text.padded(tokens, empty), batch,
                                       request.height, request.width, negative=negative), **embedded})
            for end, text in entries
        ])

    return schedule(cond), None if uncond is None else schedule(uncond, negative=True)


def release_unet(model: StableDiffusion) -> None:
    """Give the U-Net's memory back once a run has taken its last denoising step.

    The VAE decode that follows is the memory peak of generating an image (the full-resolution
    activations on top of every weight); without the U-Net resident that peak drops by the U-Net's
    size (SD1.5 in bf16: 1.7 GB), and the run's peak becomes the denoising steps'. Under `--compile`
    the compiled graph's cache keeps its own reference to the weights, so this frees nothing there.
    """
    model.unet = None
    from ldmcli.kernels import return_freed_memory

    return_freed_memory()


def noise_source(seeds: Sequence[int], shape: tuple[int, ...], device, dtype, rng: str = "cpu",
                 ensd: int = 0) -> Callable[[], torch.Tensor]:
    """Standard-normal noise for a batch, image i drawn from its own generator seeded `seeds[i]`.

    The first call gives the initial latents, later calls the samplers' ancestral noise, in the order
    diffusers draws them from `generator=`. Drawing on the CPU in fp32 makes a seed mean the same image
    whatever the device, dtype, batch size or position in the batch. rng "nv": A1111's NV generator
    (`rng_philox`), the numbers an NVIDIA GPU's torch.randn gives. ensd: A1111's eta noise seed delta,
    after the initial noise each generator restarts at its seed + ensd (A1111's ImageRNG).
    """
    if rng == "nv":
        from ldmcli.rng_philox import nv_noise_source

        return nv_noise_source(seeds, shape, device, dtype, eta_noise_seed_delta=ensd)
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    first = True

    def draw() -> torch.Tensor:
        nonlocal generators, first
        noise = torch.cat([torch.randn((1, *shape), generator=g) for g in generators])
        if first and ensd:
            generators = [torch.Generator("cpu").manual_seed(int(seed) + ensd) for seed in seeds]
        first = False
        return noise.to(device=device, dtype=dtype)

    return draw


def generate(
    model: StableDiffusion,
    request: ImageRequest,
    seeds: Sequence[int],
    *,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    vae_tile: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Images for `request`, one per seed, as uint8 [N, H, W, 3] (vae_tile: see `decode_latents`)."""
    latents = sample_latents(model, request, seeds, callback=callback)
    return decode_latents(model, latents, tile=vae_tile, match=request.match)


@torch.inference_mode()
def sample_latents(
    model: StableDiffusion,
    request: ImageRequest,
    seeds: Sequence[int],
    *,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Denoised latents for `request`, one per seed (what diffusers returns with output_type="latent").

    `request` must be resolved (`ImageRequest.checked`); its own `seed` is ignored for `seeds`.
    Raises `NonFiniteError` if any image's latents are NaN/Inf (`check_finite_latents`), unless
    `check_finite` is False: then the caller checks each image (`finite_rows`).
    """
    from ldmcli.samplers import sample

    if model.unet is None:
        raise RuntimeError("the U-Net was released after the run's last image (release_unet)")
    n = len(seeds)
    cond, uncond = guidance_conditioning(model, request, n)
    factor = model.spec.vae.downsample_factor
    latent_shape = (model.spec.vae.embed_dim, request.height // factor, request.width // factor)
    denoiser = guided_denoiser(text_to_image_network(model, n, request), model.spec.schedule, cond, uncond, request)
    latents = sample(
        request.sampler,
        model.spec.schedule,
        request.steps,
        denoiser,
        # The sampler's state stays fp32 whatever the networks compute in: bf16 keeps 8 bits of
        # mantissa, too few for latents updated in small steps over many iterations.
        noise_source(seeds, latent_shape, model.device, torch.float32, request.rng, request.ensd),
        spacing=request.schedule,
        match=request.match,
        callback=callback,
    )
    if check_finite:
        check_finite_latents(latents, seeds, model.dtype)
    return latents


def guided_denoiser(network, schedule, cond, uncond, request: ImageRequest) -> CFGDenoiser:
    """What a request's sampling calls: `network` (with token merging and DeepCache over it when the request
    asks: `token_merging.py`, `deep_cache.py`) as an x0-denoiser on `schedule`, guided between `uncond` and
    `cond` at the request's scale. The one place every sampling path (text to image, from an image, hires,
    base and refiner) builds it."""
    from ldmcli.deep_cache import with_deep_cache
    from ldmcli.denoiser import CFGDenoiser, Denoiser
    from ldmcli.token_merging import with_token_merging

    network = with_deep_cache(with_token_merging(network, request.tome), request.deep_cache)
    return CFGDenoiser(Denoiser(network, schedule), cond, uncond, request.cfg_scale)


def text_to_image_network(model: StableDiffusion, batch: int, request: ImageRequest):
    """The network text-to-image runs: the U-Net, or an inpainting U-Net (9 input channels) told to repaint
    everything over a mid-grey image (`inpaint_model.inpaint_txt2img_conditioning`, A1111's
    `txt2img_image_conditioning`; the grey image's posterior mean, where A1111 and diffusers draw a
    sample from its small spread with the global generator)."""
    if not model.spec.inpainting:
        return model.unet
    from ldmcli.denoiser import InpaintingNetwork
    from ldmcli.inpaint_model import inpaint_txt2img_conditioning

    planes = inpaint_txt2img_conditioning(model.vae, model.spec.scale_factor, batch, request.height, request.width)
    return InpaintingNetwork(model.unet, planes[:, :1], planes[:, 1:])


def finite_rows(batch: torch.Tensor) -> list[bool]:
    """For each image of a batch, whether all of its values are finite."""
    return torch.isfinite(batch).flatten(1).all(dim=1).tolist()


def check_finite_latents(latents: torch.Tensor, seeds: Sequence[int], dtype: torch.dtype) -> None:
    """Raise NonFiniteError if any image's latents hold NaN/Inf.

    NaN latents decode to NaN pixels, which clamp and round to a black image that would otherwise be
    saved as a success (a checkpoint with one NaN weight does exactly that, in any dtype).
    """
    bad = [not ok for ok in finite_rows(latents)]
    if not any(bad):
        return
    which = ", ".join(str(seed) for seed, b in zip(seeds, bad) if b)
    hint = "" if dtype == torch.float32 else f", or the U-Net overflows in {dtype_name(dtype)} (try --dtype fp32)"
    raise NonFiniteError(
        f"non-finite latents after sampling (NaN/Inf): {sum(bad)} of {len(bad)} image(s) (seed {which}); "
        f"the checkpoint's weights may hold NaN/Inf{hint}"
    )


@torch.inference_mode()
def decode_latents(
    model: StableDiffusion, latents: torch.Tensor, *, tile: tuple[int, int] | None = None, match: str = "diffusers"
) -> torch.Tensor:
    """Latents -> uint8 [N, H, W, 3], quantized as `match` does: diffusers rounds (`numpy_to_pil`),
    A1111 truncates (`(255. * x).astype(np.uint8)` in its processing.py).

    tile: (side, overlap) in latent pixels: decode in tiles of that side whose overlaps are blended
    (`vae_decode.decode_tiled`), so memory stays bounded at any image size. A decode that overflows
    (inf/NaN: SDXL's VAE in fp16 is the classic case) is redone in fp32 rather than saved as a black
    image; `model.warnings` says so. One still non-finite in fp32 raises `NonFiniteError`.
    """
    from ldmcli.vae_decode import decode_latents_safely

    vae = model.tiny_vae if model.tiny_vae is not None else model.vae
    # TAESD decodes the U-Net's latents as they are; the VAE decodes them divided by the scale factor.
    z = latents.float() if getattr(vae, "scaled_latents", False) else latents.float() / model.spec.scale_factor
    side, overlap = tile if tile is not None else (None, 0)
    images = decode_latents_safely(vae, z, tile=side, overlap=overlap, on_redo=model.warnings.append)
    images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1) * 255
    return (images if match == "a1111" else images.round()).to(torch.uint8).cpu()
