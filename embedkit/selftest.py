"""The preprocessing self-test every ``embed`` runs: a known image through the transform before the long job,
and a few items re-embedded after it (determinism). Both results go into the key's provenance (``selftest``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .errors import EmbedkitError

#: Re-embedded vectors must match the stored ones to this relative L2 error (batching and AMP cause tiny drift).
DETERMINISM_TOL = {"cpu": 2e-3, "other": 3e-2}


def test_image() -> np.ndarray:
    """A fixed uint8 RGB image (96 x 128): a bright disc on a gradient, a different pattern per channel."""
    yy, xx = np.mgrid[0:96, 0:128].astype(np.float64)
    disc = ((yy - 48) ** 2 + (xx - 64) ** 2 < 30 ** 2).astype(np.float64)
    chans = [0.2 + 0.6 * disc + 0.2 * xx / 127, 0.1 + 0.8 * disc * yy / 95, 0.05 + 0.9 * (xx / 127) * (1 - disc)]
    return np.clip(np.stack(chans, axis=2) * 255, 0, 255).astype(np.uint8)


def preprocess_selftest(encoder, conv, device: torch.device | str = "cpu",
                        transform: Callable | None = None) -> dict:
    """Run the test image through conversion, ``transform`` (default: the embed transform) and the encoder.

    Raises EmbedkitError on NaN/Inf, a constant channel, inputs outside the range the normalisation expects,
    or signs of double rescaling (an input that spans a tiny part of its expected range).
    """
    from .embed import encode, to_tensor
    from .images import to_rgb

    pre = encoder.preprocess
    image = test_image()
    if conv.per_channel:  # --channels bag|mean: as many channels as the run's images, each a different pattern
        image = np.stack([image[:, :, k % 3] for k in range(conv.channel_count or 3)], axis=2)
    try:
        rgb = to_rgb(image, conv, "self-test image")
    except (EmbedkitError, IndexError, ValueError):  # a channel map for other files: test the rest of the chain
        rgb = to_rgb(image, type(conv)(percentiles=conv.percentiles), "self-test image")
    per_channel = rgb.shape[2] != 3 or conv.per_channel is not None
    x = transform(rgb, pre) if transform else to_tensor(rgb, pre, per_channel)
    x = torch.as_tensor(x, dtype=torch.float32)
    mean = torch.tensor(pre.mean, dtype=torch.float32).repeat(x.shape[0] // 3)
    std = torch.tensor(pre.std, dtype=torch.float32).repeat(x.shape[0] // 3)
    lo, hi = (0 - mean) / std, (1 - mean) / std  # what [0, 1] inputs become after normalisation
    problems = []
    if not torch.isfinite(x).all():
        problems.append("the transformed image holds NaN or Inf")
    else:
        span = (x.amax(dim=(1, 2)) - x.amin(dim=(1, 2)))
        if (span <= 1e-6).any():
            problems.append(f"channel(s) {torch.nonzero(span <= 1e-6).ravel().tolist()} are constant after the transform")
        tol = 0.05 * (hi - lo)
        if (x.amin(dim=(1, 2)) < lo - tol).any() or (x.amax(dim=(1, 2)) > hi + tol).any():
            problems.append(f"inputs outside the expected range [{lo.min():.2f}, {hi.max():.2f}] "
                            f"(seen [{x.min():.2f}, {x.max():.2f}]): pixels not in [0, 1] before normalising")
        elif (span < 0.1 * (hi - lo)).all():
            problems.append(f"the inputs span only {float((span / (hi - lo)).max()):.1%} of their expected range: "
                            f"signs of double rescaling (pixels already in [0, 1] divided by 255 again)")
    if not problems:
        with torch.inference_mode():
            v = encode(encoder.to(device), x[None].to(device), conv.per_channel)[0]
        if not np.isfinite(v).all():
            problems.append("the encoder returns NaN or Inf for the test image")
    if problems:
        raise EmbedkitError("preprocessing self-test failed: " + "; ".join(problems))
    return {"image": "embedkit.selftest.test_image (96x128 uint8)", "passed": True,
            "input_range": [round(float(x.min()), 4), round(float(x.max()), 4)]}


def determinism_check(stored: np.ndarray, again: np.ndarray, device: torch.device | str) -> dict:
    """Compare re-embedded vectors with the stored ones; raise EmbedkitError when they differ beyond tolerance."""
    tol = DETERMINISM_TOL["cpu" if str(device).startswith("cpu") else "other"]
    ok = np.isfinite(stored).all(axis=1)
    if not ok.any():
        return {"items": 0, "passed": True}
    err = np.linalg.norm(again[ok] - stored[ok], axis=1) / np.maximum(np.linalg.norm(stored[ok], axis=1), 1e-12)
    out = {"items": int(ok.sum()), "max_relative_error": float(err.max()), "tolerance": tol, "passed": bool(err.max() <= tol)}
    if not out["passed"]:
        raise EmbedkitError(f"determinism self-test failed: {ok.sum()} items re-embedded differ from their stored vectors "
                            f"by up to {err.max():.2e} (relative, tolerance {tol:g}); the progress is kept")
    return out


def recheck_run(ds, encode: Callable[[torch.Tensor], list[np.ndarray]], runs: Sequence, device: torch.device | str,
                n: int = 4) -> list[dict]:
    """Re-embed up to ``n`` good items per run that this invocation embedded, one by one, and compare them with
    what the run's shards hold; ``encode`` gives a batch's vectors per output (its usual output, then each chosen
    layer), in the order of ``runs``."""
    pos = {str(i): k for k, (i, _) in enumerate(ds.entries)}
    stored: list[list[np.ndarray]] = [[] for _ in runs]
    again: list[list[np.ndarray]] = [[] for _ in runs]
    cache: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for k, run in enumerate(runs):
            for shard in run.shards():
                if len(stored[k]) >= n:
                    break
                c = type(run).read(shard, "ids", "vectors")
                for j, i in enumerate(c["ids"]):
                    if len(stored[k]) >= n:
                        break
                    if str(i) in pos and np.isfinite(c["vectors"][j]).all():
                        if str(i) not in cache:
                            _, x, _ = ds[pos[str(i)]]
                            cache[str(i)] = [v[0] for v in encode(x[None].to(device))]
                        again[k].append(cache[str(i)][k])
                        stored[k].append(np.asarray(c["vectors"][j], dtype=np.float32).ravel())
    out = []
    for s_k, a_k in zip(stored, again):
        if not s_k:
            out.append({"items": 0, "passed": True})
            continue
        stored_a = np.stack(s_k)
        out.append(determinism_check(stored_a, np.asarray(a_k, dtype=np.float32).reshape(stored_a.shape), device))
    return out
