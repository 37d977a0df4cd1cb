"""Why the kNN stage's matrix products left torch: decoding a batch of 8 bottle images (2 threads) right after
a torch GEMM, an ONNX Runtime GEMM (threads that sleep when idle) or nothing. torch's OpenMP threads keep
spinning after the product and take the cores from the decoding threads. ms per image, median of 40.

    .venv/bin/python benchmarks/spin_decode.py
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from hyads.pipeline import rgb_batch


def main(data: str = "../shared/data/mvtec_ad/bottle/train/good") -> None:
    torch.set_num_threads(2)
    paths = sorted(Path(data).glob("*.png"))[:8]
    q, a, c = torch.randn(8192, 152), torch.randn(152, 64), torch.randn(64, 123)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["q", "a"], ["z"]), helper.make_node("MatMul", ["z", "c"], ["cd"])], "g",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [None, 152])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 64]),
         helper.make_tensor_value_info("cd", TensorProto.FLOAT, [None, 123])],
        [numpy_helper.from_array(a.numpy(), "a"), numpy_helper.from_array(c.numpy(), "c")])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                so, providers=["CPUExecutionProvider"])
    qn = q.numpy()
    gemms = {"nothing": lambda: None, "torch GEMM": lambda: (q @ a) @ c,
             "ONNX Runtime GEMM": lambda: sess.run(None, {"q": qn})}
    print("| before decoding | decode ms/img | GEMM ms/img |")
    print("|---|---|---|")
    for _ in range(2):
        for name, gemm in gemms.items():
            dec, gm = [], []
            for _ in range(40):
                t0 = time.perf_counter()
                gemm()
                t1 = time.perf_counter()
                rgb_batch(paths, 256)
                dec.append(time.perf_counter() - t1)
                gm.append(t1 - t0)
            print(f"| {name} | {1000 * np.median(dec) / 8:.2f} | {1000 * np.median(gm) / 8:.2f} |")


if __name__ == "__main__":
    main()
