"""Encoding path of the default model, stage by stage: JPEG decode, preprocessing, image backbone (eager
PyTorch vs ONNX Runtime fp32 vs ONNX Runtime int8), heads, text encoder, and the whole
``encode_images_with_features`` call, at batch sizes 1, 8 and 32, on one thread (what one worker child uses)
and on all cores.

Images: the sample catalog that ships in the repo (samples/catalog, 212 product photos). Writes
bench/results/encoding.json and bench/results/encoding.md.

    .venv/bin/python bench/encoding.py            # about 4 minutes on 2 cores
    .venv/bin/python bench/encoding.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tagger.encoders.default import DefaultEncoder  # noqa: E402
from tagger.encoders.preprocess import colour_histograms, to_lite_array  # noqa: E402
from tagger.images import ImageLimits, decode_image  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BATCHES = (1, 8, 32)


def sample_images() -> list[bytes]:
    folder = ROOT / "samples" / "catalog" / "images"
    return [p.read_bytes() for p in sorted(folder.glob("*.jpg"))]


def per_second(fn: Callable[[int], Any], n_items: int, batch: int, min_s: float) -> float:
    """Items per second of ``fn(start)`` processing ``batch`` items, repeated for at least ``min_s``."""
    fn(0)  # warm-up (allocations, ONNX Runtime's first-run planning)
    done, start, i = 0, time.perf_counter(), 0
    while True:
        fn((i * batch) % max(1, n_items - batch))
        done += batch
        i += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s and i >= 3:
            return done / elapsed


def onnx_int8_session(fp32_model: bytes, calibration: np.ndarray, threads: int) -> Any:
    """Static QDQ int8 quantisation of the backbone, calibrated on real preprocessed images."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{"x": calibration[i : i + 8]} for i in range(0, len(calibration), 8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    tmp = RESULTS / ".tmp-int8"
    tmp.mkdir(parents=True, exist_ok=True)
    src, pre, dst = tmp / "fp32.onnx", tmp / "pre.onnx", tmp / "int8.onnx"
    src.write_bytes(fp32_model)
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(dst), sess_options=opts, providers=["CPUExecutionProvider"])
    for path in (src, pre, dst):
        path.unlink()
    tmp.rmdir()
    return session


def export_onnx(pooled: torch.nn.Module, size: int) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(pooled, (torch.zeros(2, 3, size, size),), buf, input_names=["x"], output_names=["f"],
                          dynamic_axes={"x": {0: "n"}, "f": {0: "n"}}, dynamo=False)
    return buf.getvalue()


def run(threads: int, min_s: float, data: list[bytes]) -> dict[str, Any]:
    import onnxruntime as ort

    torch.set_num_threads(threads)
    encoder = DefaultEncoder(device="cpu")
    encoder.load()
    backbone = encoder._backbone  # noqa: SLF001 - the benchmark times the stages one by one
    assert backbone is not None
    from tagger.settings import Settings

    limits = ImageLimits.from_settings(Settings())
    images = [decode_image(d, limits) for d in data]
    arrays = to_lite_array(images, backbone.size)
    titles = [f"Men Navy Blue Checked Shirt {i}" for i in range(len(images))]
    n = len(images)
    out: dict[str, Any] = {"threads": threads, "rows": []}

    fp32 = export_onnx(backbone._pooled, backbone.size)  # noqa: SLF001
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    onnx_fp32 = ort.InferenceSession(fp32, sess_options=opts, providers=["CPUExecutionProvider"])
    onnx_int8 = onnx_int8_session(fp32, arrays[:64], threads)

    def eager(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return backbone._pooled(torch.from_numpy(batch)).numpy()  # noqa: SLF001

    stages: dict[str, Callable[[int, int], Any]] = {
        "decode (JPEG bytes → RGB)": lambda s, b: [decode_image(d, limits) for d in data[s : s + b]],
        "preprocess (pad, resize, normalise + colour histogram)":
            lambda s, b: (to_lite_array(images[s : s + b], backbone.size), colour_histograms(images[s : s + b])),
        "backbone, eager PyTorch": lambda s, b: eager(arrays[s : s + b]),
        "backbone, ONNX Runtime fp32": lambda s, b: onnx_fp32.run(None, {"x": arrays[s : s + b]}),
        "backbone, ONNX Runtime int8": lambda s, b: onnx_int8.run(None, {"x": arrays[s : s + b]}),
        "text encoder (MiniLM + head)": lambda s, b: encoder.encode_texts(titles[s : s + b], batch_size=b),
        "encode_images_with_features (preprocess + backbone + heads)":
            lambda s, b: encoder.encode_images_with_features(images[s : s + b], batch_size=b),
        "worker's encode step (decode + images + texts)":
            lambda s, b: (encoder.encode_images_with_features([decode_image(d, limits) for d in data[s : s + b]],
                                                              batch_size=b),
                          encoder.encode_texts(titles[s : s + b], batch_size=b)),
    }
    for name, fn in stages.items():
        row: dict[str, Any] = {"stage": name}
        for batch in BATCHES:
            row[f"b{batch}"] = round(per_second(lambda s, fn=fn, batch=batch: fn(s, batch), n, batch, min_s), 1)
        out["rows"].append(row)
        print(f"[{threads} thread(s)] {name}: " + ", ".join(f"b{b} {row[f'b{b}']}/s" for b in BATCHES), flush=True)

    # Fidelity of int8 against fp32 features: cosine, and whether the model's zero-shot top category changes.
    f32 = onnx_fp32.run(None, {"x": arrays})[0]
    i8 = onnx_int8.run(None, {"x": arrays})[0]
    cos = (f32 * i8).sum(1) / (np.linalg.norm(f32, axis=1) * np.linalg.norm(i8, axis=1))
    out["int8_feature_cosine"] = {"mean": round(float(cos.mean()), 4), "min": round(float(cos.min()), 4)}
    out["int8_top1_agreement"] = round(top1_agreement(encoder, images, f32, i8), 4)
    return out


def top1_agreement(encoder: DefaultEncoder, images: list[Image.Image], f32: np.ndarray, i8: np.ndarray) -> float:
    """Share of images whose top category (shipped taxonomy, image only) is the same with int8 features."""
    from tagger import scoring
    from tagger.taxonomy.loader import load_taxonomies

    taxonomies = load_taxonomies(ROOT / "taxonomies")
    category = next(a for a in taxonomies.attributes if a.name == "category")
    proto = scoring.build_prototypes(type(taxonomies)((next(t for t in taxonomies.taxonomies
                                                            if category in t.attributes),)), encoder.encode_texts)
    vectors = proto["category"].vectors
    hist = colour_histograms(images)
    heads = encoder._heads  # noqa: SLF001

    def top(features: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.concatenate([features, hist], axis=1).astype(np.float32))
        with torch.inference_mode():
            z = heads.image(x).float().numpy()
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        return (z @ vectors.T).argmax(1)

    return float((top(f32) == top(i8)).mean())


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Machine: {result['machine']}; images: {result['images']} sample-catalog photos; "
             f"{result['seconds']:.0f} s in all.", ""]
    for run_ in result["runs"]:
        lines += [f"**{run_['threads']} thread(s)** (images or texts per second)", "",
                  "| stage | batch 1 | batch 8 | batch 32 |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['stage']} | {r['b1']} | {r['b8']} | {r['b32']} |" for r in run_["rows"]]
        lines += ["", f"int8 vs fp32 backbone features: cosine mean {run_['int8_feature_cosine']['mean']}, "
                      f"min {run_['int8_feature_cosine']['min']}; zero-shot top category unchanged for "
                      f"{run_['int8_top1_agreement']:.1%} of the images.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short timings (a smoke run)")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="thread counts to run, e.g. 1,2")
    args = parser.parse_args()
    data = sample_images()
    started = time.perf_counter()
    threads = sorted({int(t) for t in args.threads.split(",")})
    runs = [run(t, 0.5 if args.quick else 3.0, data) for t in threads]
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"torch {torch.__version__}", "images": len(data), "runs": runs,
              "seconds": time.perf_counter() - started,
              "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "encoding-quick" if args.quick else "encoding"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(result) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
