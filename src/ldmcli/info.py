"""`ldm info`: what a model file is, or what an image was made with. Reads headers, not weights, where it can."""

from __future__ import annotations

from pathlib import Path


def describe_model(name: str) -> dict:
    from ldmcli.detect import detect_spec
    from ldmcli.hashing import model_hash
    from ldmcli.layout import read_components
    from ldmcli.models_dir import resolve_model

    path = resolve_model(name)
    components = read_components(path, meta=True)
    spec = detect_spec(components)
    networks = components.networks  # the SDXL refiner has no text_encoder, only text_encoder_2 (bigG)
    described = {
        "path": str(path),
        "layout": components.layout,
        "family": spec.family,
        "name": spec.display_name,
        "prediction_type": spec.prediction_type,
        "prediction_source": spec.prediction_source,
        "schedule_source": spec.schedule_source,
        "timestep_spacing": spec.schedule.timestep_spacing,
        "scale_factor": spec.scale_factor,
        "native_size": spec.native_size,
        "inpainting": spec.inpainting,
        "refiner": spec.refiner,
        "hash": model_hash(path),
    }
    for network, tensors in networks.items():
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
        described[f"{network}_parameters"] = sum(t.numel() for t in tensors.values())
        described[f"{network}_dtype"] = "/".join(dtypes)
        described[f"{network}_from"] = components.sources.get(network, str(path))
    described["unet_config"] = _fields(spec.unet)
    described["vae_config"] = _fields(spec.vae)
    if spec.text_encoder is not None:
        described["text_encoder_config"] = _fields(spec.text_encoder)
    if spec.text_encoder_2 is not None:
        described["text_encoder_2_config"] = _fields(spec.text_encoder_2)
    if spec.inpainting:  # what the 9 input channels are
        described["unet_inputs"] = "latents (4) + mask (1) + masked-image latents (4)"
    if spec.refiner:  # what its vector conditioning holds, with the defaults it is run with
        from ldmcli.conditioning import AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE

        described["vector_conditioning"] = (f"pooled bigG + original size, crop, aesthetic score (prompt "
                                            f"{AESTHETIC_SCORE}, negative prompt {NEGATIVE_AESTHETIC_SCORE})")
    if spec.lcm:  # a latent consistency model: how it takes guidance decides how it is run
        described["lcm"] = (f"LCM-distilled: guidance embedded in the U-Net (time_cond_proj_dim {spec.unet.time_cond_proj_dim})"
                            if spec.embedded_guidance else "LCM (LoRA merged): an ordinary U-Net run with the lcm sampler")
    if spec.recommended:
        described["recommended"] = spec.recommended
    if spec.notes:
        described["notes"] = list(spec.notes)
    if components.metadata:
        described["metadata"] = components.metadata
    return described


def describe_image(path: Path) -> dict:
    """What an image records, as `ldm generate --from-png` reads it: the request's fields the image sets,
    the model record, and what ldm would not honour (`not_honoured`) or reads with a remark (`notes`).
    The notes that depend on the model (clip skip on SD 2.x/SDXL) are `generate`'s to add."""
    from dataclasses import replace

    from ldmcli.jobs import Job, prompt_tag_notes
    from ldmcli.metadata import A1111_KEY, read_png_parameters, read_png_text

    text = read_png_text(path)  # refuses a missing file, a FIFO or device, anything but a PNG
    found = read_png_parameters(text, str(path))
    described = {"path": str(path), "made_by": found.made_by}
    # Only what the image records: a field A1111's text leaves out was not necessarily ldm's default.
    described.update({name: value for name, value in found.request.record().items() if name in found.given})
    described["model"] = found.model
    job = replace(Job(found.request), notes=found.notes).noting(prompt_tag_notes(found.request))
    described["not_honoured"] = job.not_honoured
    described["notes"] = job.remarks
    if A1111_KEY in text:
        described["parameters"] = text[A1111_KEY]
    return described


def _fields(config) -> dict:
    return dict(config.__dict__)
