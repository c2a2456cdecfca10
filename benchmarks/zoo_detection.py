"""torchvision detection models: analysis time and memory, and kill-and-rebuild.

Each model (random initialization, 5 classes) is analysed in training mode with one image and
one target (a box; a mask for Mask R-CNN, 17 keypoints for Keypoint R-CNN). A random quarter of
the Gamma-regularized channel groups is made exactly dead, the model is rebuilt with
``apply_structure(model, reg, inputs, keep_weights=True)``, and in eval mode the slim model must
compute what the network computes before its data-dependent post-processing (the dense heads,
the R-CNN box / mask / keypoint predictors given the original's proposals) with relative error
< 1e-4 for each. The final detections (score threshold 0, so a randomly
initialized model reports 100) are compared too (``same_detections``) but not required: random
weights give nearly tied scores, and last-bit differences reorder them.

    python benchmarks/zoo_detection.py [NAME ...] [--size 256] [--quick] [--out benchmarks/results/zoo_detection.json]

``flops`` (``get_cost()`` with every channel alive) must equal FlopCounterMode's count of the conv
and linear ops of the same training-mode forward, per image.

The model's own transform resizes the image (to 800x800 by default). Peak memory is the
process's maximum resident set size so far, so run one model per process to compare them.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

import morphnet
from morphnet.capture.graph import preserved_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from nets import LAYER_OPS, kill_groups, random_dead_groups  # noqa: E402

MODELS = ("fcos_resnet50_fpn", "retinanet_resnet50_fpn", "ssdlite320_mobilenet_v3_large",
          "fasterrcnn_mobilenet_v3_large_fpn", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn")
QUICK = ("ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn")  # 5 s each
# outputs compared: everything the network computes before data-dependent post-processing (the
# backbone's features are internal: their channels may be pruned)
DENSE = ("head", "rpn.head", "rpn", "roi_heads.box_predictor", "roi_heads.mask_predictor",
         "roi_heads.keypoint_predictor")


def inputs(name: str, size: int) -> tuple[list[torch.Tensor], list[dict]]:
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(1))
    target = {"boxes": torch.tensor([[10.0, 20.0, 100.0, 120.0]]), "labels": torch.tensor([1])}
    if "mask" in name:
        target["masks"] = torch.zeros(1, size, size, dtype=torch.uint8)
        target["masks"][0, 20:120, 10:100] = 1
    if "keypoint" in name:
        target["keypoints"] = torch.tensor([[[50.0, 60.0, 1.0]] * 17])
    return [image], [target]


def run(model: torch.nn.Module, images: list[torch.Tensor], proposals=None) -> tuple[dict, list[dict]]:
    """Eval-mode detections and the outputs of the dense parts (``DENSE``) on the way.

    With ``proposals`` (the original's region proposals), the model's RPN output is replaced by
    them, so the second stage of an R-CNN sees the same boxes: with random weights the proposal
    scores are nearly tied, and the last-bit differences of the slim model reorder them."""
    dense: dict[str, list[torch.Tensor]] = {}
    modules = dict(model.named_modules())

    def keep(name):
        def hook(module, args, out):
            dense[name] = [t.detach().clone() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            if name == "rpn" and proposals is not None:
                return [p.clone() for p in proposals], out[1]
        return hook

    handles = [modules[n].register_forward_hook(keep(n)) for n in DENSE if n in modules]
    try:
        with torch.no_grad():
            detections = model(images)
    finally:
        for h in handles:
            h.remove()
    if "rpn" in dense:
        dense["rpn"] = dense["rpn"][:len(images)]
    return dense, detections


def relative_error(want: list[torch.Tensor], got: list[torch.Tensor] | None) -> float:
    """Largest relative error (Frobenius) over matching tensors; inf when the shapes differ."""
    if got is None or len(got) != len(want):
        return float("inf")
    worst = 0.0
    for a, b in zip(want, got):
        if a.shape != b.shape:
            return float("inf")
        a, b = a.double(), b.double()
        worst = max(worst, ((b - a).norm() / a.norm().clamp_min(1e-12)).item())
    return worst


def training_flops(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict]) -> int:
    """Conv / linear FLOPs per image that FlopCounterMode counts in one training-mode forward (as
    analysed: with two copies of the image when BatchNorm cannot train on one, as the analysis does)."""
    try:
        with preserved_state(model), FlopCounterMode(display=False) as counter, torch.no_grad():
            model.train()
            model(images, targets)
    except ValueError as e:
        if "Expected more than 1 value per channel" not in str(e):
            raise
        return training_flops(model, images * 2, targets * 2)
    counts = counter.get_flop_counts()["Global"]
    return sum(c for op, c in counts.items() if str(op).split(".")[1] in LAYER_OPS) // len(images)


def peak_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)  # KiB on Linux


def check(name: str, size: int) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=5)
    if hasattr(model, "transform"):  # Keypoint R-CNN trains at a random scale of 640-800: fix it at 800
        model.transform.min_size = (max(model.transform.min_size),)
    images, targets = inputs(name, size)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = morphnet.GammaFlopsRegularizer(model, (images, targets), gamma_threshold=1e-3)
    row = {"model": name, "image": size, "analysis_s": round(time.perf_counter() - start, 1),
           "analysis_peak_gb": peak_gb(), "recorded_on": reg.analysis.graph.recorded_on,
           "flops": reg.get_cost().item(), "prunable_layers": len(morphnet.StructureExporter(reg).get_alive_counts()),
           "regularized_groups": int(reg.grouping.regularized.sum()), "groups": int(reg.analysis.num_groups)}
    row["flop_counter"] = training_flops(model, images, targets)
    row["flops_exact"] = row["flops"] == row["flop_counter"]
    dead, _ = random_dead_groups(reg, seed=0)
    kill_groups(model, reg, dead, seed=0)
    model.eval()
    if hasattr(model, "score_thresh"):  # FCOS, RetinaNet
        model.score_thresh = 0.0
    if hasattr(model, "roi_heads"):  # R-CNNs
        model.roi_heads.score_thresh = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers that keep one channel group
        slim = morphnet.apply_structure(model, reg, (images, targets), keep_weights=True).eval()
    want_dense, want = run(model, images)
    got_dense, got = run(slim, images, proposals=want_dense.get("rpn"))
    errors = {name: relative_error(want_dense[name], got_dense.get(name)) for name in want_dense if name != "rpn"}
    row.update(killed_groups=int(dead.sum()), rel_error={k: float(f"{v:.3g}") for k, v in errors.items()},
               detections=[len(w["boxes"]) for w in want],
               same_detections=all(relative_error(list(w.values()), list(g.values())) < 1e-4
                                   for w, g in zip(want, got)),
               param_fraction=round(sum(p.numel() for p in slim.parameters()) /
                                    sum(p.numel() for p in model.parameters()), 3),
               peak_gb=peak_gb(), rebuild_exact=bool(errors) and max(errors.values()) < 1e-4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(MODELS), help=f"default: {' '.join(MODELS)}")
    parser.add_argument("--size", type=int, default=256, help="image side before the model's transform")
    parser.add_argument("--quick", action="store_true", help=f"only the two small ones: {' '.join(QUICK)}")
    parser.add_argument("--device", choices=["cpu"], default="cpu", help="CPU only (the check needs no GPU)")
    parser.add_argument("--out", default="benchmarks/results/zoo_detection.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in QUICK if args.quick else args.names:
        try:
            rows.append(check(name, args.size))
        except Exception as e:  # report every model
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}"[:300], "rebuild_exact": False})
        r = rows[-1]
        print(f"{name:28s} " + (f"ERROR {r['error']}" if "error" in r else
              f"analysis {r['analysis_s']}s {r['analysis_peak_gb']} GB, flops {r['flops']:.4g} "
              f"{'exact' if r['flops_exact'] else 'MISMATCH ' + str(r['flop_counter'])}, rebuild "
              f"{'exact' if r['rebuild_exact'] else 'WRONG'} {r['rel_error']} params {r['param_fraction']:.0%} "
              f"peak {r['peak_gb']} GB"), flush=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__, "rows": rows},
                                  indent=2))


if __name__ == "__main__":
    main()
