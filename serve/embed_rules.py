"""What `embed`'s options cannot be together, checked without torch or the job's modules.

`dmtjepa embed` asks before its heavy imports, so a clash is one sentence in well under a second;
`EmbedOptions` asks again when it is built (the Python API). Values outside each option's choices
are the option parser's and `EmbedOptions`'s to refuse.
"""

from __future__ import annotations


def option_problems(
    *,
    engine: str = "local",
    address: str | None = None,
    decode_workers: int | None = None,
    model_workers: int = 1,
    gpus_per_worker: float = 0.0,
    decode: str = "cpu",
    layout: str = "tar",
    dtype: str = "float16",
    layers: tuple[int, ...] | None = None,
    pca: int | None = None,
    head: bool = False,
) -> list[str]:
    """Each clash between the options as one sentence, in the order they are checked."""
    problems = []
    ray_only = {
        "--address": address is not None,
        "--decode-workers": decode_workers is not None,
        "--model-workers": model_workers != 1,
        "--gpus-per-worker": gpus_per_worker != 0,
    }
    if engine != "ray" and any(ray_only.values()):
        given = ", ".join(flag for flag, set_ in ray_only.items() if set_)
        problems.append(f"{given} only apply to --engine ray; add --engine ray or leave them out.")
    if model_workers < 1 or gpus_per_worker < 0 or (decode_workers is not None and decode_workers < 1):
        problems.append("--model-workers and --decode-workers must be at least 1 and --gpus-per-worker at least 0.")
    if decode == "gpu" and engine == "ray":
        problems.append("--decode gpu runs with --engine local; the Ray engine decodes in its own tasks on CPUs.")
    if pca is not None and pca < 1:
        problems.append(f"--pca {pca} is not a number of dimensions; give one of at least 1.")
    if layout == "embedding-reader" and layers:
        problems.append("--layout embedding-reader holds pooled vectors only; use --layout array for --layers.")
    if layout == "embedding-reader" and dtype == "int8":
        problems.append("embedding-reader reads float16 or float32 vectors only; use --dtype float16 or float32.")
    if layers and pca is not None:
        problems.append("--layers and --pca cannot be combined: the layers would stay unprojected; choose one.")
    if head and pca is not None:
        problems.append("--head classifies the encoder's own embeddings, which --pca projects away; choose one.")
    if head and engine == "ray":
        problems.append("--head runs with --engine local; label maps are not written by the Ray engine.")
    if head and layout != "tar":
        problems.append(
            f"--head stores a labels.npy member per sample, which --layout {layout} has no room for; use --layout tar."
        )
    return problems
