"""What model is this? Family recognition from key names, configs from tensor shapes.

Shapes give widths, depths and attention levels; what they cannot give (head counts, latent
scale factor, noise schedule, prediction type) comes from the family's constants, a diffusers
folder's configs, or an honest guess that is reported — the approach of ComfyUI's
`model_detection.py`. `ModelSpec` is the single source of truth about a loaded model.

Families (the text encoders decide; the U-Net must agree):
- sd1:  one OpenAI CLIP ViT-L (HF names), 8-head U-Net, epsilon, 512 px;
- sd2:  one OpenCLIP ViT-H (penultimate block + final LN), 64-channel heads, linear projections,
        v-prediction for the 768 models and epsilon for 512-base / SD-Turbo;
- sdxl: CLIP ViT-L + OpenCLIP bigG (penultimate of both, concatenated; pooled bigG projected) and
        a U-Net with vector conditioning `y` (pooled text + size/crop sinusoids), scale 0.13025;
        the SDXL refiner (`ModelSpec.refiner`): bigG alone, its `y` pooled bigG + original size, crop
        and aesthetic score (Stability's sd_xl_refiner.yaml).

Any family's U-Net may be an inpainting one (`ModelSpec.inpainting`): 9 input channels, the latents
followed by the mask and the masked image's latents (`inpaint_model.py`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from ldmcli.errors import CheckpointError, UnsupportedModelError
from ldmcli.layout import Components
from ldmcli.models.clip import CLIPTextConfig, clip_config_from_shapes
from ldmcli.models.unet import UNetConfig, unet_config_from_shapes
from ldmcli.models.vae import VAEConfig, vae_config_from_shapes
from ldmcli.schedule import DiffusionSchedule
from ldmcli.unsupported import INPAINTING_CHANNELS, check_single_encoder_unet, check_unet_input_channels
from ldmcli.limits import MAX_TRAIN_TIMESTEPS


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a model that is not a weight."""

    family: str  # "sd1" | "sd2" | "sdxl" (the SDXL refiner too: `refiner`)
    unet: UNetConfig
    vae: VAEConfig
    text_encoder: CLIPTextConfig | None  # SDXL: the CLIP ViT-L; None: the SDXL refiner (bigG alone)
    schedule: DiffusionSchedule
    schedule_source: str = field(compare=False)  # where the schedule (spacing, betas) came from (provenance)
    scale_factor: float  # latents are divided by this before decoding (not stored in weights)
    clip_skip: int  # blocks of text encoder 1 skipped before its final LN (SD1 0; SD2 single files 1)
    pad_token_id: int  # SD1/SDXL-L (OpenAI tokenizer) pad with <|endoftext|> 49407, OpenCLIP with 0
    native_size: int  # the image side the model was trained at
    display_name: str = "Stable Diffusion 1.x"  # the family for people ("Stable Diffusion XL")
    text_encoder_2: CLIPTextConfig | None = None  # SDXL: OpenCLIP bigG with its text_projection
    pad_token_id_2: int | None = None  # SDXL tokenizer 2 pads with "!" = 0, as OpenCLIP does
    addition_time_embed_dim: int | None = None  # SDXL: width of each size/crop sinusoid in y (256)
    # The SDXL refiner (sd_xl_refiner_1.0): bigG alone (`text_encoder` None), and a `y` of pooled bigG +
    # original size, crop and aesthetic score (`conditioning.refiner_vector`) in place of the target size.
    refiner: bool = False
    zero_empty_negative: bool = False  # SDXL: an empty negative prompt conditions on zeros, not on ""
    vae_fp16_unsafe: bool = False  # SDXL's VAE overflows in fp16: decode in fp32 instead
    turbo: bool = False  # an adversarially distilled 1-4 step model (SD-Turbo, SDXL-Turbo)
    # A latent consistency model (4-8 steps with the lcm sampler): LCM-distilled (`embedded_guidance`), or an
    # ordinary U-Net with LCM-LoRA merged in, known by its name or its folder's LCMScheduler config.
    lcm: bool = False
    recommended: dict = field(default_factory=dict)  # generation defaults the model calls for (Turbo, demo)
    # How the prediction type was decided, and any guess the user should hear about (provenance,
    # not part of the model: excluded from ==).
    prediction_source: str = field(default="", compare=False)
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def prediction_type(self) -> str:
        """"epsilon" or "v_prediction"."""
        return self.schedule.prediction_type

    @property
    def inpainting(self) -> bool:
        """An inpainting U-Net (sd.cpp's `sd_version_is_inpaint`): it takes the latents plus 5 channels,
        the mask and the masked image's latents (`inpaint_model.inpaint_txt2img_conditioning` for txt2img)."""
        return self.unet.in_channels == INPAINTING_CHANNELS

    @property
    def embedded_guidance(self) -> bool:
        """An LCM-distilled U-Net: guidance is its input (`timestep_cond`, w = CFG - 1), never CFG's two passes."""
        return self.unet.time_cond_proj_dim is not None

    @property
    def max_clip_skip(self) -> int:
        """The largest clip skip (A1111's numbering) the text encoder(s) have blocks for: each step back
        needs one more block before the layer the family conditions on (`text_conditioning`)."""
        if self.text_encoder_2 is None:
            assert self.text_encoder is not None
            return self.text_encoder.layers - self.clip_skip
        if self.text_encoder is None:  # the refiner: bigG alone
            return self.text_encoder_2.layers - 1
        return min(self.text_encoder.layers, self.text_encoder_2.layers) - 1


@dataclass(frozen=True)
class Family:
    """Constants of a model family that no tensor shape reveals."""

    name: str
    display: str
    unet_num_heads: int | None  # SD1: always 8 heads, whatever the width
    unet_head_dim: int | None  # SD2/SDXL: 64-channel heads
    text_activation: str
    scale_factor: float
    pad_token_id: int
    native_size: int
    upcast_attention: bool = False  # single files: SD2.1 needs fp32 attention scores in fp16
    text_2_activation: str | None = None  # SDXL's second encoder
    pad_token_id_2: int | None = None
    vae_fp16_unsafe: bool = False


SD1 = Family(
    name="sd1",
    display="Stable Diffusion 1.x",
    unet_num_heads=8,
    unet_head_dim=None,
    text_activation="quick_gelu",
    scale_factor=0.18215,
    pad_token_id=49407,
    native_size=512,
)
SD2 = Family(
    name="sd2",
    display="Stable Diffusion 2.x",
    unet_num_heads=None,
    unet_head_dim=64,
    text_activation="gelu",  # OpenCLIP uses exact GELU
    scale_factor=0.18215,
    pad_token_id=0,  # OpenCLIP's tokenizer pads with 0 ("!" in diffusers' tokenizer folders)
    native_size=768,  # the v-prediction models; 512-base and SD-Turbo are 512 (see _native_size)
    upcast_attention=True,  # diffusers' SD 2.1 config; a no-op in fp32
)
SDXL = Family(
    name="sdxl",
    display="Stable Diffusion XL",
    unet_num_heads=None,
    unet_head_dim=64,
    text_activation="quick_gelu",  # OpenAI CLIP ViT-L
    scale_factor=0.13025,
    pad_token_id=49407,
    native_size=1024,
    text_2_activation="gelu",
    pad_token_id_2=0,  # diffusers' SDXL tokenizer_2 pads with "!" (id 0), as OpenCLIP does
    vae_fp16_unsafe=True,  # the SDXL VAE's activations overflow fp16 (black/NaN images)
)
FAMILIES = {f.name: f for f in (SD1, SD2, SDXL)}

# Turbo models (Sauer et al. 2023, "Adversarial Diffusion Distillation") sample in 1-4 steps from
# t=999: diffusers' SD-Turbo/SDXL-Turbo folders configure EulerAncestralDiscreteScheduler with
# timestep_spacing "trailing" (Lin et al. 2023), no classifier-free guidance, 512 x 512.
TURBO_RECOMMENDED = {"steps": 1, "cfg_scale": 1.0, "sampler": "euler_a", "width": 512, "height": 512}

# Latent consistency models (Luo et al. 2023) sample with LCMScheduler in 4 steps (the default of diffusers'
# LatentConsistencyModelPipeline and of its LCM-LoRA guides). An ordinary U-Net with LCM-LoRA merged in runs
# without CFG (guidance_scale 1 in diffusers' LCM-LoRA docs; A1111/SD.Next: CFG 1-2). An LCM-distilled U-Net
# (time_cond_proj_dim) takes guidance as an input, w = guidance_scale - 1, at LatentConsistencyModelPipeline's
# default guidance_scale 8.5 (trained on w in [3, 13], diffusers' LCM docs).
LCM_RECOMMENDED = {"steps": 4, "cfg_scale": 1.0, "sampler": "lcm"}
LCM_DISTILLED_RECOMMENDED = {"steps": 4, "cfg_scale": 8.5, "sampler": "lcm"}
# A name says LCM when "lcm" stands as a word or after a digit: "AbsoluteReality_LCM", "dreamshaper_8LCM",
# "lcm-sdxl", "LCM_Dreamshaper_v7".
_LCM_NAME = re.compile(r"(?<![a-z])lcm(?![a-z])")

# ComfyUI's SD2 rule (comfy/supported_models.py, SD20.model_type): v-prediction when the std of
# this bias exceeds 0.09. Real 768-v and 512-base weights differ there; nothing else in the file does.
V_PRED_STD_THRESHOLD = 0.09

PREDICTIONS = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}


def detect_spec(components: Components, *, prediction: str | None = None) -> ModelSpec:
    """Build the ModelSpec of a model from its tensors' shapes, configs and family constants.

    prediction: "epsilon"/"eps" or "v_prediction"/"v" overrides whatever the checkpoint says or
    we would guess.
    """
    if prediction is not None and prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {sorted(PREDICTIONS)}, got {prediction!r}")
    family = _family(components)
    where = components.path
    unet = _unet_config(components, family)
    check_unet_input_channels(where, unet)
    text = None
    if components.text_encoder is not None:
        activation = _activation(components, "text_encoder", family.text_activation)
        text = _from_shapes(components, "text encoder", clip_config_from_shapes, components.text_encoder, activation=activation)
    text_2 = None
    time_dim = None
    refiner = family is SDXL and text is None
    if family is SDXL:
        text_2, time_dim = _sdxl_text(components, unet, text)
    else:
        if text is None:  # bigG alone, yet a header declares another family
            raise UnsupportedModelError(f"{where}: no text encoder of the {family.display} family")
        check_single_encoder_unet(where, unet)
        if text.width != unet.context_dim:
            raise UnsupportedModelError(
                f"{where}: text encoder width {text.width} does not match the U-Net's context width {unet.context_dim}"
            )

    turbo = _says_turbo(components)
    notes: list[str] = []
    lcm = _lcm(components, unet, notes)
    schedule, schedule_source = _schedule(components, family, turbo, notes)
    predicted, prediction_source = _prediction(components, family, turbo, prediction, notes)
    schedule = dataclasses.replace(schedule, prediction_type=predicted)
    if family is SD2 and components.text_encoder_format == "openclip":
        clip_skip = 1  # the OpenCLIP tower is whole: condition on its penultimate block (+ final LN)
    else:
        clip_skip = 0  # SD1's last block; diffusers' SD2 text encoder already ends at the penultimate
    native = _native_size(family, predicted, turbo)
    scaling = _vae_setting(components, "scaling_factor", family.scale_factor)
    scale_factor = _positive(components, "vae/config.json scaling_factor", scaling)
    inpainting = unet.in_channels == INPAINTING_CHANNELS
    suffixes = [(" Refiner", refiner), (" Turbo", turbo), (" LCM", lcm), (" Inpainting", inpainting)]
    return ModelSpec(
        family=family.name,
        display_name=family.display + "".join(text for text, yes in suffixes if yes),
        unet=unet,
        vae=_from_shapes(components, "VAE", vae_config_from_shapes, components.vae),
        text_encoder=text,
        text_encoder_2=text_2,
        schedule=schedule,
        schedule_source=schedule_source,
        prediction_source=prediction_source,
        scale_factor=_float_metadata(components, "ldm.scale_factor", scale_factor),
        clip_skip=clip_skip,
        pad_token_id=family.pad_token_id,
        pad_token_id_2=family.pad_token_id_2,
        native_size=int(_float_metadata(components, "ldm.native_size", native)),
        addition_time_embed_dim=time_dim,
        refiner=refiner,
        zero_empty_negative=family is SDXL and bool(components.pipeline_index.get("force_zeros_for_empty_prompt",
                                                                                 not refiner)),
        vae_fp16_unsafe=family.vae_fp16_unsafe and bool(_vae_setting(components, "force_upcast", True)),
        turbo=turbo,
        lcm=lcm,
        recommended=_recommended(components, turbo, lcm, unet.time_cond_proj_dim is not None),
        notes=tuple(notes),
    )


def _recommended(components: Components, turbo: bool, lcm: bool = False, distilled: bool = False) -> dict:
    """Generation defaults the model calls for: Turbo's or LCM's, then any `ldm.default_*` header (the demo model)."""
    from ldmcli.request import recommended_in_metadata

    family = TURBO_RECOMMENDED if turbo else {}
    if lcm:
        family = LCM_DISTILLED_RECOMMENDED if distilled else LCM_RECOMMENDED
    try:
        return {**family, **recommended_in_metadata(components.metadata)}
    except ValueError as exc:
        raise CheckpointError(f"{components.path}: header recommends {exc}") from exc


# --- family --------------------------------------------------------------------------------------


def _family(components: Components) -> Family:
    """The text encoders decide the family; the U-Net must agree (checked by the callers)."""
    declared = components.metadata.get("ldm.family")
    if declared is not None:
        if declared not in FAMILIES:
            raise UnsupportedModelError(f"{components.path}: header says ldm.family={declared!r}; known: {sorted(FAMILIES)}")
        return FAMILIES[declared]
    if components.text_encoder_2 is not None:
        return SDXL
    if components.layout == "single-file":
        return SD2 if components.text_encoder_format == "openclip" else SD1
    # diffusers folders store every text encoder in HF names: the activation tells OpenCLIP from OpenAI.
    act = components.configs.get("text_encoder", {}).get("hidden_act")
    if act is not None:
        return SD2 if act == "gelu" else SD1
    linear = any(k.endswith("proj_in.weight") and len(v.shape) == 2 for k, v in components.unet.items())
    return SD2 if linear else SD1


def _unet_config(components: Components, family: Family) -> UNetConfig:
    """Structure from shapes; heads and attention upcast from the folder config, the header or the family."""
    from ldmcli.keymap.unet import unet_config_from_diffusers

    meta = components.metadata
    num_heads, head_dim = family.unet_num_heads, family.unet_head_dim
    # A safetensors header may state what shapes cannot (our demo model does); the family rule otherwise.
    if "ldm.unet.num_heads" in meta or "ldm.unet.head_dim" in meta:
        num_heads = _header_count(components, "ldm.unet.num_heads")
        head_dim = _header_count(components, "ldm.unet.head_dim")
    unet = _from_shapes(components, "U-Net", unet_config_from_shapes, components.unet, num_heads=num_heads, head_dim=head_dim)
    if "unet" in components.configs:
        try:
            configured = unet_config_from_diffusers(components.configs["unet"])
        except (ValueError, KeyError, TypeError, AttributeError, ArithmeticError) as exc:
            raise CheckpointError(f"{components.path}: unet/config.json: {_message(exc)}") from exc
        keep = {"num_heads", "head_dim", "upcast_attention"}
        structure = {f.name for f in dataclasses.fields(UNetConfig)} - keep
        differs = [n for n in sorted(structure) if getattr(configured, n) != getattr(unet, n)]
        if differs:
            raise UnsupportedModelError(f"{components.path}: unet/config.json disagrees with the weights on {differs}")
        return configured
    return dataclasses.replace(unet, upcast_attention=family.upcast_attention)


def _activation(components: Components, network: str, default: str) -> str:
    return components.configs.get(network, {}).get("hidden_act", default)


def _sdxl_text(components: Components, unet: UNetConfig, text: CLIPTextConfig | None) -> tuple[CLIPTextConfig, int]:
    """The bigG config, and the width of each size/crop sinusoid that shapes imply.

    SDXL base: context = [CLIP-L | bigG], y = [pooled | 6 sinusoids: original size, crop top-left, target
    size] (sd_xl_base.yaml). The refiner (`text` None: bigG alone): context = bigG, y = [pooled | 5
    sinusoids: original size, crop top-left, aesthetic score] (sd_xl_refiner.yaml: adm_in_channels 2560 =
    1280 + 5 x 256; diffusers: `requires_aesthetics_score`).
    """
    where = components.path
    assert components.text_encoder_2 is not None
    text_2 = _from_shapes(
        components, "text encoder 2", clip_config_from_shapes, components.text_encoder_2,
        activation=_activation(components, "text_encoder_2", SDXL.text_2_activation),
    )
    what = "SDXL's second text encoder" if text is not None else "the SDXL refiner's text encoder (bigG)"
    if text_2.projection_dim is None:
        raise UnsupportedModelError(f"{where}: {what} has no text_projection (needed for the pooled embedding)")
    widths = [text_2.width] if text is None else [text.width, text_2.width]
    if sum(widths) != unet.context_dim:
        raise UnsupportedModelError(
            f"{where}: text encoder widths {' + '.join(map(str, widths))} do not add up to the U-Net's context width "
            f"{unet.context_dim}"
        )
    if unet.adm_in_channels is None:
        raise UnsupportedModelError(f"{where}: {what} beside a U-Net without vector conditioning (label_emb)")
    count, embedded = (6, "size embeddings") if text is not None else (5, "size/crop/aesthetic-score embeddings")
    declared = components.pipeline_index.get("requires_aesthetics_score")
    if declared is not None and bool(declared) != (text is None):
        raise UnsupportedModelError(
            f"{where}: model_index.json requires_aesthetics_score={declared} but the model has "
            f"{'no' if text is None else 'a'} CLIP ViT-L text encoder (only the SDXL refiner, bigG alone, takes an "
            "aesthetic score)"
        )
    rest = unet.adm_in_channels - text_2.projection_dim
    if rest <= 0 or rest % count:
        raise UnsupportedModelError(
            f"{where}: U-Net vector input {unet.adm_in_channels} is not the pooled width {text_2.projection_dim} + "
            f"{count} {embedded}"
        )
    configured = components.configs.get("unet", {}).get("addition_time_embed_dim")
    if configured is not None and (not isinstance(configured, int) or configured * count != rest):
        raise UnsupportedModelError(f"{where}: unet/config.json addition_time_embed_dim={configured} disagrees with the weights")
    return text_2, rest // count


def _vae_setting(components: Components, key: str, default):
    value = components.configs.get("vae", {}).get(key)
    return default if value is None else value


# --- schedule and prediction ------------------------------------------------------------------------


def _says_turbo(components: Components) -> bool:
    """Turbo files are the same architectures; only their name (or header) tells. A folder in the
    Hugging Face hub cache is named by commit: its repository is two levels up
    (`models--stabilityai--sdxl-turbo/snapshots/<commit>`)."""
    meta = components.metadata
    path = components.path
    texts = [path.name, meta.get("modelspec.title", ""), meta.get("modelspec.architecture", "")]
    if path.parent.name == "snapshots":
        texts.append(path.parent.parent.name)
    return any("turbo" in t.lower() for t in texts)


def _lcm(components: Components, unet: UNetConfig, notes: list[str]) -> bool:
    """Whether this is a latent consistency model, with a note saying how it is known and how to run it.

    An LCM-distilled U-Net has the guidance-embedding projection (`time_embedding.cond_proj`,
    diffusers' time_cond_proj_dim). A model with LCM-LoRA merged in is an ordinary U-Net: only its folder's
    scheduler (LCMScheduler) or its name tells, as for Turbo. The LCM sampler assumes LCMScheduler's
    defaults (50 original steps, timestep scaling 10); a config that changes them is refused."""
    config = components.scheduler_config or {}
    by_config = config.get("_class_name") == "LCMScheduler"
    if by_config:
        for key, default in (("original_inference_steps", 50), ("timestep_scaling", 10.0)):
            if config.get(key, default) != default:
                raise UnsupportedModelError(f"{components.path}: scheduler/scheduler_config.json: LCMScheduler with "
                                            f"{key}={config[key]!r}; the lcm sampler runs {key}={default}")
    if unet.time_cond_proj_dim is not None:
        notes.append(
            f"LCM-distilled U-Net (guidance embedding, time_cond_proj_dim={unet.time_cond_proj_dim}): guidance is "
            "the network's input (w = CFG scale - 1), with no negative-prompt pass; use the lcm sampler, 4-8 steps"
        )
        return True
    meta = components.metadata
    names = [components.path.name, meta.get("modelspec.title", "")]
    if components.path.parent.name == "snapshots":
        names.append(components.path.parent.parent.name)
    by_name = any(_LCM_NAME.search(n.lower()) for n in names)
    if by_config or by_name:
        how = "its scheduler config (LCMScheduler)" if by_config else "its name"
        notes.append(f"LCM model (from {how}): use the lcm sampler, 4-8 steps, CFG scale 1-2")
    return by_config or by_name


def _schedule(components: Components, family: Family, turbo: bool, notes: list[str]) -> tuple[DiffusionSchedule, str]:
    if components.scheduler_config is not None:
        try:
            _check_schedule_numbers(components.scheduler_config)
            schedule = DiffusionSchedule.from_diffusers_config(components.scheduler_config)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{components.path}: scheduler/scheduler_config.json: {_message(exc)}") from exc
        return schedule, "scheduler/scheduler_config.json"
    if turbo:
        notes.append(
            "Turbo model (from its name): timesteps spaced 'trailing' so one step starts at t=999, as "
            "diffusers' SD-Turbo/SDXL-Turbo scheduler config; use 1-4 steps with CFG scale 1"
        )
        return DiffusionSchedule(timestep_spacing="trailing"), f"{family.display} Turbo defaults (scaled_linear betas, trailing spacing)"
    return DiffusionSchedule(), f"{family.display} defaults (scaled_linear betas, leading spacing)"


def _check_schedule_numbers(config: dict) -> None:
    """Raise ValueError for a scheduler config number that would fail or misbehave only when sampling
    (DiffusionSchedule checks the names: beta_schedule, prediction_type, timestep_spacing)."""
    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    timesteps = config.get("num_train_timesteps", 1000)
    if not (whole(timesteps) and 1 <= timesteps <= MAX_TRAIN_TIMESTEPS):
        raise ValueError(f"num_train_timesteps {timesteps!r} is not a whole number from 1 to {MAX_TRAIN_TIMESTEPS}")
    for key in ("beta_start", "beta_end"):
        beta = config.get(key, 0.01)
        if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 < beta < 1):
            raise ValueError(f"{key} {beta!r} is not a number between 0 and 1")
    if config.get("beta_start", 0) > config.get("beta_end", 1):  # noise grows with t: betas do too
        raise ValueError(f"beta_start {config['beta_start']} is above beta_end {config['beta_end']}")
    offset = config.get("steps_offset", 0)
    if not (whole(offset) and 0 <= offset < timesteps):
        raise ValueError(f"steps_offset {offset!r} is not a whole number from 0 to {timesteps - 1}")
    if not isinstance(config.get("set_alpha_to_one", False), bool):
        raise ValueError(f"set_alpha_to_one {config['set_alpha_to_one']!r} is not true or false")


def _prediction(
    components: Components, family: Family, turbo: bool, override: str | None, notes: list[str]
) -> tuple[str, str]:
    """(prediction type, how it was decided). Guesses are explained in `notes`."""
    if override is not None:
        return PREDICTIONS[override], "override"
    if components.scheduler_config is not None:  # its prediction_type was checked by `_schedule`
        return components.scheduler_config.get("prediction_type", "epsilon"), "scheduler/scheduler_config.json"
    if "v_pred" in components.markers:
        return "v_prediction", "the file's 'v_pred' marker tensor (ComfyUI/Forge convention)"
    meta = components.metadata
    for key in ("ldm.prediction_type", "modelspec.prediction_type"):
        if key in meta and meta[key].lower() in PREDICTIONS:
            return PREDICTIONS[meta[key].lower()], f"the file's {key} header"
    if family is not SD2:
        return "epsilon", f"{family.display} default"
    if turbo:
        notes.append("SD-Turbo predicts epsilon (Stability's sd_2_1.yaml); pass the prediction override if images look wrong")
        return "epsilon", "SD-Turbo (from the file name)"
    probe = _v_pred_probe(components.unet)
    if probe is None:
        notes.append("SD 2.x single file: could not read the weights the v-prediction guess needs; assumed epsilon")
        return "epsilon", "guess (SD 2.x single file; no probe weights)"
    name, std = probe
    guess = "v_prediction" if std > V_PRED_STD_THRESHOLD else "epsilon"
    kind = "a 768-v model" if guess == "v_prediction" else "a 512-base model"
    notes.append(
        f"SD 2.x single files do not say their prediction type; guessed {guess} ({kind}) as ComfyUI does: "
        f"std of {name} = {std:.3f} {'>' if std > V_PRED_STD_THRESHOLD else '<='} {V_PRED_STD_THRESHOLD}. "
        "Override it if images come out wrong (washed out or noise)"
    )
    return guess, f"guess from the weights (ComfyUI's rule: {name} std {std:.3f})"


_PROBE = re.compile(r"output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias")


def _v_pred_probe(unet: dict) -> tuple[str, float] | None:
    """ComfyUI reads output_blocks.11 of the real SD2 U-Net: the last output block with attention."""
    found = sorted((int(m.group(1)), k) for k in unet if (m := _PROBE.fullmatch(k)))
    if not found:
        return None
    key = found[-1][1]
    tensor = unet[key]
    if tensor.is_meta:
        return None
    return "model.diffusion_model." + key, tensor.float().std(unbiased=False).item()


def _native_size(family: Family, prediction: str, turbo: bool) -> int:
    if turbo:
        return 512  # SD-Turbo and SDXL-Turbo were distilled at 512 x 512
    if family is SD2:
        return 768 if prediction == "v_prediction" else 512  # 768-v vs 512-base
    return family.native_size


def _header_count(components: Components, key: str) -> int | None:
    """A positive whole number from the safetensors header, None when absent or "none"."""
    value = components.metadata.get(key)
    if value in (None, "", "none"):
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 6 and int(value) > 0):
        raise CheckpointError(f"{components.path}: header {key} is {value!r}, not a positive whole number")
    return int(value)


def _float_metadata(components: Components, key: str, default: float) -> float:
    value = components.metadata.get(key)
    return default if value is None else _positive(components, f"header {key}", value)


def _positive(components: Components, what: str, value) -> float:
    """A finite positive number from a header string or a config value; CheckpointError otherwise
    (a NaN scale factor would make every image NaN, "x" fail when the first image decodes)."""
    try:
        number = float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise CheckpointError(f"{components.path}: {what} is {value!r}, not a positive number")
    return number


def _shapes(tensors: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


# The tensors each shape rule (`*_config_from_shapes` in models/) indexes into, with the number of
# dimensions they have (convolutions 4, linear layers and embeddings 2). One of another rank is refused
# naming it, before the rule's `shape[1]` fails with an IndexError.
_RULE_RANKS = {
    unet_config_from_shapes: (
        (re.compile(r"input_blocks\.0\.0\.weight|out\.2\.weight|input_blocks\.\d+\.0\.out_layers\.3\.weight"), 4),
        (re.compile(r".*\.attn2\.to_k\.weight|label_emb\.0\.0\.weight|time_embedding\.cond_proj\.weight"), 2),
    ),
    vae_config_from_shapes: (
        (re.compile(r"(en|de)coder\.conv_(in|out)\.weight|encoder\.down\.\d+\.block\.0\.conv1\.weight|(post_)?quant_conv\.weight"), 4),
    ),
    clip_config_from_shapes: (
        (re.compile(r"text_model\.embeddings\.(token|position)_embedding\.weight|text_model\.encoder\.layers\.0\.mlp\.fc1\.weight"
                    r"|text_projection\.weight"), 2),
    ),
}


def _from_shapes(components: Components, what: str, rule, tensors: dict, **kwargs):
    """A network's config from its tensors' shapes (`rule` is a `*_config_from_shapes`); a file whose
    shapes do not make a network is a CheckpointError naming it, never a raw IndexError or ValueError."""
    shapes = _shapes(tensors)
    for pattern, rank in _RULE_RANKS[rule]:
        for key, shape in shapes.items():
            if len(shape) != rank and pattern.fullmatch(key):
                raise CheckpointError(f"{components.path}: {what} tensor {key} has shape {list(shape)}; "
                                      f"this layer's weight has {rank} dimensions")
    try:
        return rule(shapes, **kwargs)
    except (ValueError, KeyError, IndexError, TypeError, ArithmeticError) as exc:
        raise CheckpointError(f"{components.path}: {what}: {_message(exc)}") from exc


def _message(exc: BaseException) -> str:
    """An exception's message on one line (a KeyError's str() is the repr of its message)."""
    text = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0]
