"""The transformer example: ``morphnet run --model vit_tiny`` learns head counts and MLP widths of a
small ViT on the generated images, and the report shows the heads of every block.

The head counts of the report are checked against the attention modules of the models themselves:
the slim model loaded back from the run folder, and seeds rebuilt here with heads killed.
"""

import contextlib
import io
import json

import pytest
import torch

import morphnet
from morphnet.cli.main import main
from morphnet.pipeline.tables import attention_table
from morphnet.reporting import format_attention
from morphnet.seeds import create_seed
from morphnet.surgery.attention import head_counts
from nets import counted_flops

BLOCKS = [f"encoder.layers.encoder_layer_{i}" for i in range(4)]
ATTENTION = [f"{block}.self_attention" for block in BLOCKS]
X16 = torch.randn(1, 3, 16, 16)


def vit16():
    torch.manual_seed(0)
    return create_seed("vit_tiny", image_size=16)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """A short run on 16x16 generated images: learning stays above the target, so the rebuild trims the
    learned widths with one multiplier, which removes heads (the structure applied has 2 of 4)."""
    out = tmp_path_factory.mktemp("vit_run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["run", "--model", "vit_tiny", "--data", "synthetic:128", "--image-size", "16",
                     "--regularizer", "group-lasso", "--steps", "4", "--batch-size", "16", "--log-every", "2",
                     "--no-baseline", "--out", str(out), "--threads", "1", "--quiet"])
    assert code == 0
    return out, printed.getvalue()


def test_vit_tiny_is_built_for_the_data_and_has_four_blocks_of_four_heads():
    assert head_counts(create_seed("vit_tiny")) == {name: (4, 16) for name in ATTENTION}
    grey = create_seed("vit_tiny", in_channels=1, image_size=8)
    assert grey(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_seed("vit_tiny", image_size=18)


def test_the_run_reports_the_heads_of_the_slim_model_it_saved(vit_run):
    vit_run, printed = vit_run
    summary = json.loads((vit_run / "summary.json").read_text())
    assert summary["input"]["seed_kwargs"] == {"image_size": 16}  # built for the data's size
    slim = morphnet.load_slim(lambda: create_seed("vit_tiny", image_size=16), vit_run / "slim", X16)
    heads = head_counts(slim)
    structure = summary["slim"]["widths"]
    assert [e["module"] for e in summary["attention"]] == ATTENTION
    assert [e["block"] for e in summary["attention"]] == BLOCKS
    for entry in summary["attention"]:
        # the count the structure asks for (3 projections of 16 per head) is the one the slim model has
        assert entry["slim"] == heads[entry["module"]][0] == structure[entry["module"]] // 3 // 16
        assert (entry["seed"], entry["head_dim"]) == (4, 16)
        assert entry["mlp"] == [{"name": "mlp.0", "seed": 256, "learned": summary["learned"]["widths"][
            f"{entry['block']}.mlp.0"], "slim": slim.get_submodule(f"{entry['block']}.mlp.0").out_features}]
    assert any(h < 4 for h, _ in heads.values())  # heads were removed, and the report says so
    page = (vit_run / "report.html").read_text()
    assert "attention heads per block (seed -> slim):" in printed and "<h2>Attention heads per block</h2>" in page
    for entry in summary["attention"]:
        learned = summary["learned"]["widths"][entry["module"]] // 48
        note = f" (learned {learned})" if learned != entry["slim"] else ""
        assert f"{entry['block']}  heads 4 -> {entry['slim']}{note}, head width 16, mlp.0 256 -> " in printed
        assert f"<td>{entry['block']}</td><td>{entry['module']}</td><td>4 -&gt; {entry['slim']}{note}</td>" in page
    # the slim model's own analysis sees its packed input projections: MorphNet's count is FlopCounterMode's
    assert summary["slim"]["flops"] == summary["slim"]["flops_counted"] == counted_flops(slim, X16)


def test_a_head_killed_in_the_learned_structure_is_reported_for_its_block():
    seed = vit16()
    learned = {ATTENTION[1]: 48, ATTENTION[2]: 0, f"{BLOCKS[3]}.mlp.0": 97}  # 1 head, no head, a narrower MLP
    slim = morphnet.apply_structure(seed, learned, X16)
    seed_widths = {**{name: 192 for name in ATTENTION}, **{f"{b}.mlp.0": 256 for b in BLOCKS}}
    table = attention_table(seed, slim, slim, seed_widths, learned, learned)
    assert [(e["seed"], e["learned"], e["slim"]) for e in table] == [(4, 4, 4), (4, 1, 1), (4, 0, 0), (4, 4, 4)]
    assert [e["mlp"][0]["slim"] for e in table] == [256, 256, 256, 97]
    text = format_attention({"attention": table})
    assert text.splitlines() == [
        "attention heads per block (seed -> slim):",
        f"  {BLOCKS[0]}  heads 4 -> 4, head width 16, mlp.0 256 -> 256",
        f"  {BLOCKS[1]}  heads 4 -> 1, head width 16, mlp.0 256 -> 256",
        f"  {BLOCKS[2]}  heads 4 -> 0, head width 16, mlp.0 256 -> 256",
        f"  {BLOCKS[3]}  heads 4 -> 4, head width 16, mlp.0 256 -> 97",
    ]
    # a block without heads still runs, and its cost is counted as FlopCounterMode counts it
    assert slim(X16).shape == (1, 10)
    assert morphnet.compute_cost(slim, X16) == counted_flops(slim, X16)
    learn_only = attention_table(seed, slim, None, seed_widths, learned, None)
    assert format_attention({"attention": learn_only}).splitlines()[:3] == [
        "attention heads per block (seed -> learned):",
        f"  {BLOCKS[0]}  heads 4 -> 4, head width 16, mlp.0 256 -> 256",
        f"  {BLOCKS[1]}  heads 4 -> 1, head width 16, mlp.0 256 -> 256"]


def test_the_slim_vit_is_analysed_like_the_seed_so_it_can_be_pruned_again():
    slim = morphnet.apply_structure(vit16(), {ATTENTION[0]: 96}, X16)
    reg = morphnet.GroupLassoFlopsRegularizer(slim, X16, threshold=1e-9)
    counts = morphnet.StructureExporter(reg).get_alive_counts()
    assert counts[ATTENTION[0]] == 96 and counts[ATTENTION[1]] == 192
    assert reg.get_cost().item() == counted_flops(slim, X16)
    again = morphnet.apply_structure(slim, {ATTENTION[0]: 48}, X16)
    assert head_counts(again)[ATTENTION[0]] == (1, 16)


def test_heads_are_read_from_timm_and_config_only_hugging_face_modules():
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    x = torch.randn(1, 3, 32, 32)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                           num_heads=4, num_classes=10)
    slim = morphnet.apply_structure(vit, {"blocks.1.attn.qkv": 48}, x)  # qkv rows: 3 x 2 heads of 8
    assert head_counts(slim) == {"blocks.0.attn": (4, 8), "blocks.1.attn": (2, 8)}
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    llama = transformers.LlamaForCausalLM(config)  # its attention keeps the head count only in the config
    tokens = torch.randint(0, 96, (1, 8))
    one_head = {f"model.layers.0.self_attn.{p}_proj": 8 for p in "qkv"}
    thin = morphnet.apply_structure(llama, one_head, tokens)
    assert head_counts(llama) == {"model.layers.0.self_attn": (4, 8)}
    assert head_counts(thin) == {"model.layers.0.self_attn": (1, 8)}
    table = attention_table(llama, thin, thin, {"model.layers.0.self_attn.q_proj": 32,
                                                "model.layers.0.mlp.gate_proj": 64}, {}, {})
    assert table[0]["block"] == "model.layers.0" and table[0]["mlp"][0]["name"] == "mlp.gate_proj"


def test_models_without_attention_report_no_heads():
    cnn = create_seed("resnet14")
    assert head_counts(cnn) == {}
    assert attention_table(cnn, None, None, {"conv1": 16}, {"conv1": 8}, None) == []
    assert format_attention({"attention": []}) == "" and format_attention({}) == ""


def test_trim_to_target_takes_the_closest_multiplier_when_whole_heads_cannot_land_within_one_percent():
    """Learning that stays far above the target (0.6x against 0.25x) must still be trimmed to near the target:
    heads are whole 16-channel blocks, so no multiplier lands within 1%, and the rebuild used to fall back to
    the untrimmed learned widths (0.6x: 2.4 times the budget) instead of the closest multiplier."""
    from types import SimpleNamespace

    from morphnet.pipeline.stages import rebuild_stage

    seed = vit16()
    seed_cost = float(morphnet.compute_cost(seed, X16))
    counts = {**{f"{block}.mlp.0": width for block, width in zip(BLOCKS, (120, 92, 80, 77))},  # a learned run's
              **{name: 192 for name in ATTENTION}}  # every head alive (q, k and v rows of 4 heads)
    learned_cost = float(morphnet.compute_cost(morphnet.apply_structure(seed, counts, X16), X16))
    target = 0.25 * seed_cost
    logged = []
    cfg = SimpleNamespace(expand_to=None, target="flops", seed=0, hardware=None, round_to=None)
    session = SimpleNamespace(cfg=cfg, example=X16, log=logged.append)
    with pytest.raises(ValueError, match="within 1%"):
        morphnet.find_width_multiplier(seed, counts, X16, target)  # the premise: 1% is out of reach
    rebuilt, predicted = rebuild_stage(session, seed, counts, learned_cost=learned_cost, seed_cost=seed_cost,
                                       target_cost=target)
    slim_cost = float(morphnet.compute_cost(rebuilt.model, X16))
    assert predicted == pytest.approx(slim_cost)
    assert slim_cost == pytest.approx(counted_flops(rebuilt.model, X16), rel=1e-6)
    assert abs(slim_cost / target - 1) < 0.1, (slim_cost / seed_cost, learned_cost / seed_cost)
    assert rebuilt.width_multiplier is not None and rebuilt.width_multiplier < 1
    assert any("closest width multiplier" in line for line in logged)
