"""Resharding a checkpoint across tensor-parallel sizes, one parameter at a time (consolidate.py).

`split_param` must cut exactly what `parallelize` puts on each TP rank, and `merge_param` must put any tensor of a
parameter's shape (the weight, Adam's moments) back together. The TP ranks are built in this one process: megatron-
core asks its TP group only for size() and rank() while building a layer, so a stand-in group (over a one-process
gloo world, which megatron needs initialized) gives each rank's layers exactly as a real TP group would.
"""
import copy

import pytest
import torch
import torch.distributed as dist

from brivl_ds.config import MocoConfig
from brivl_ds.models.brivl import BriVL
from brivl_ds.moco.model import BriVLMoCo
from brivl_ds.checkpointing.consolidate import (ParamSplit, local_shape, merge_param, merge_tp_shards, split_param,
                                           tp_layout)
from brivl_ds.parallel.tensor_parallel import parallelize
from test_towers import small_model_config

VOCAB = 51  # odd: padded to 52 rows at TP = 2 and 4
BACKBONES = ["test_convnext", "vit_small_patch16_224", "eva02_small_patch14_224"]  # CNN (replicated), ViT, EVA-02


class StandInGroup:
    """What megatron-core reads of a TP group while building its layers."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.fixture(scope="module", autouse=True)
def one_process_world(tmp_path_factory):
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def model_config(backbone: str):
    cfg = small_model_config(backbone)
    cfg.text.num_heads, cfg.text.sa_heads, cfg.image.num_heads = 4, 4, 4  # TP = 4 splits the CNN model too
    if backbone != "test_convnext":  # as test_tensor_parallel builds them (6 heads: TP = 2 only), 2 blocks
        cfg.image.qk_norm, cfg.image.layer_scale, cfg.image.backbone_depth = True, 0.1, 2
    if backbone.startswith("eva"):
        cfg.image.image_size = 56
    return cfg


def whole_model(backbone: str) -> BriVLMoCo:
    """A BriVLMoCo whose every parameter (online and momentum alike, zero-initialized biases, the embedding's
    padding row) holds distinct random values, so that any misplaced row or column shows."""
    torch.manual_seed(0)
    model = BriVLMoCo(BriVL(model_config(backbone), vocab_size=VOCAB), MocoConfig())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def held(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t for n, t in model.state_dict().items() if not n.endswith("_extra_state")}  # megatron's extra state


def tp_ranks(whole: BriVLMoCo, tp: int, vocab_parallel: bool) -> list[BriVLMoCo]:
    return [parallelize(copy.deepcopy(whole), tp, rank, StandInGroup(tp, rank), vocab_parallel)
            for rank in range(tp)]


@pytest.mark.parametrize("backbone,vocab_parallel,tps", [
    ("test_convnext", False, (2, 4)), ("test_convnext", True, (2, 4)),
    ("vit_small_patch16_224", True, (2,)), ("eva02_small_patch14_224", False, (2,)),
    ("eva02_small_patch14_224", True, (2,))])
def test_split_param_is_what_each_tp_rank_holds(backbone, vocab_parallel, tps):
    whole = whole_model(backbone)
    full = held(whole)
    layout = tp_layout(whole, vocab_parallel=vocab_parallel)
    styles = {s.style for s in layout.values()}
    assert {"column", "row"} <= styles and ("vocab" in styles) == vocab_parallel
    assert ("vector" in styles) == backbone.startswith("eva")  # EVA's q / v bias vectors
    assert any(n.startswith("online.image.backbone.blocks.1.") for n in layout) == (backbone != "test_convnext")
    for tp in tps:
        ranks = tp_ranks(whole, tp, vocab_parallel)
        for rank, model in enumerate(ranks):
            # the layout names exactly the parameters megatron-core marks as split; the rest is replicated
            marked = {n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)}
            assert marked == set(layout)
            holds = held(model)
            assert holds.keys() == full.keys()
            for name, value in holds.items():
                expected = split_param(layout.get(name), full[name], tp, rank)
                assert torch.equal(expected, value), (tp, rank, name)
        # and the whole state dict back from the ranks' (what `consolidate` does after zero_to_fp32)
        merged = merge_tp_shards([held(m) for m in ranks], whole, vocab_parallel=vocab_parallel)
        assert merged.keys() == full.keys()
        for name, value in full.items():
            assert torch.equal(merged[name], value), (tp, name)


def test_tp2_checkpoint_reshards_to_what_tp4_ranks_hold():
    """TP = 2 ranks' parameters, merged one at a time and cut for TP = 4, are what TP = 4 ranks build."""
    whole = whole_model("test_convnext")
    layout = tp_layout(whole, vocab_parallel=True)
    tp2 = [held(m) for m in tp_ranks(whole, 2, True)]
    tp4 = [held(m) for m in tp_ranks(whole, 4, True)]
    for name in tp2[0]:
        full = merge_param(layout.get(name), [shard[name] for shard in tp2])
        for rank in range(4):
            assert torch.equal(split_param(layout.get(name), full, 4, rank), tp4[rank][name]), (rank, name)


def meta_layout(backbone: str, vocab_parallel: bool = True) -> dict[str, ParamSplit]:
    with torch.device("meta"):  # shapes only: a 10B model's layout without its storage
        return tp_layout(BriVLMoCo(BriVL(model_config(backbone), vocab_size=VOCAB), MocoConfig()),
                         vocab_parallel=vocab_parallel)


def test_layout_needs_no_storage():
    whole = whole_model("eva02_small_patch14_224")
    assert meta_layout("eva02_small_patch14_224") == tp_layout(whole, vocab_parallel=True)
    online = {n.removeprefix("online."): s for n, s in tp_layout(whole, ("online.",), True).items()}
    assert tp_layout(whole.online, ("",), True) == online  # a bare BriVL


@pytest.mark.parametrize("backbone", BACKBONES)
def test_merge_inverts_split_for_any_tensor_of_the_shape(backbone):
    """Random tensors of each split parameter's shape, as Adam's exp_avg / exp_avg_sq are (float64: the dtype is
    kept), round trip through TP = 1, 2, 4, and TP = 2 -> full -> TP = 4, also flattened; splits the heads refuse
    are refused."""
    g = torch.Generator().manual_seed(1)
    layout = meta_layout(backbone)
    refused = set()
    for name, split in layout.items():
        x = torch.randn(split.shape, generator=g, dtype=torch.float64)
        for tp in (1, 2, 4):
            if split.heads % tp:
                refused.add((tp, split.heads))
                with pytest.raises(ValueError, match="heads"):
                    split_param(split, x, tp, 0)
                continue
            parts = [split_param(split, x, tp, rank) for rank in range(tp)]
            assert all(p.shape == local_shape(split, tp) and p.is_contiguous() for p in parts), (tp, name)
            assert sum(p.numel() for p in parts) == (x.numel() if split.style != "vocab" else
                                                     -(-split.shape[0] // tp) * tp * split.shape[1])
            merged = merge_param(split, parts)
            assert merged.dtype == torch.float64 and torch.equal(merged, x), (tp, name)
            flat = merge_param(split, [p.flatten().view(local_shape(split, tp)) for p in parts]).flatten()
            assert torch.equal(flat, x.flatten()), (tp, name)
        if not split.heads % 4:  # TP = 2 -> TP = 4 through the full tensor
            full = merge_param(split, [split_param(split, x, 2, rank) for rank in range(2)])
            for rank in range(4):
                assert torch.equal(split_param(split, full, 4, rank), split_param(split, x, 4, rank)), name
    assert refused == (set() if backbone == "test_convnext" else {(4, 6)})  # ViT-S / EVA-02-S: 6 heads


def test_replicated_parameters_and_wrong_shapes():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    assert split_param(None, x, 2, 1) is x and merge_param(None, [x, y]) is x  # rank 0's copy
    column, row = ParamSplit("column", (4, 8)), ParamSplit("row", (4, 8))
    assert torch.equal(split_param(row, x, 2, 1), x[:, 4:]) and torch.equal(split_param(column, x, 2, 1), x[2:])
    with pytest.raises(ValueError, match="shards"):
        merge_param(column, [x[:, :4], x[:, 4:]])  # row-parallel shards given as a column split
    with pytest.raises(ValueError, match="given"):
        split_param(column, x.T, 2, 0)
    with pytest.raises(ValueError, match="divide"):
        split_param(row, x, 3, 0)
    vocab = ParamSplit("vocab", (5, 2))  # 5 rows padded to 6 at TP = 2 (3 each) and to 8 at TP = 4 (2 each)
    v = torch.arange(10.0).view(5, 2)
    assert split_param(vocab, v, 2, 1).tolist() == [[6, 7], [8, 9], [0, 0]]
    assert split_param(vocab, v, 4, 3).tolist() == [[0, 0], [0, 0]]
    assert torch.equal(merge_param(vocab, [split_param(vocab, v, 4, r) for r in range(4)]), v)
