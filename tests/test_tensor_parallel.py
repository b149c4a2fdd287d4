"""Tensor parallelism (megatron-core) on CPU/gloo: TP=2 towers equal the TP=1 towers they were split from.

References are the unsplit towers in the same process: outputs must match, and every parameter's gradient must
equal the matching slice of the TP=1 gradient (row-parallel biases and replicated parameters whole).
"""
import copy

import pytest
import torch

from conftest import run_distributed
from test_towers import random_batch, small_model_config

pytestmark = pytest.mark.slow


def test_megatron_core_imports_on_a_cpu_only_host():
    import megatron.core  # failed on CPU-only hosts in 0.15.0 (Megatron-LM issue 2715)
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: F401

    assert megatron.core.__version__


def sliced_like(reference: torch.nn.Module, values: dict[str, torch.Tensor], tp: int, rank: int, group):
    """A copy of `reference` holding `values` (e.g. its gradients) in place of its weights, split like the model:
    the expected per-rank slice of every TP parameter, by the same rules, for free."""
    from brivl_ds.parallel.tensor_parallel import parallelize_towers

    holder = copy.deepcopy(reference)
    for name, p in holder.named_parameters():
        p.data = values[name].clone()
    return dict(parallelize_towers(holder, tp, rank, group).named_parameters())


def _tp_worker(rank, world, pretrained_dir):
    import torch.distributed as dist

    from brivl_ds.models.brivl import BriVL
    from brivl_ds.parallel.groups import init_tensor_parallel
    from brivl_ds.parallel.tensor_parallel import parallelize_towers

    dist.init_process_group("gloo")
    groups = init_tensor_parallel(2)
    assert (groups.tp, groups.dp, groups.tp_rank) == (2, 1, rank)
    torch.manual_seed(0)  # the same whole model on both ranks, as every TP rank builds it
    cfg = small_model_config()
    cfg.text.num_heads, cfg.text.sa_heads, cfg.image.num_heads = 4, 4, 4
    cfg.text.trainable_top_layers = 1  # frozen layers stay frozen in their TP form
    if pretrained_dir:
        cfg.text.pretrained_path = pretrained_dir
    reference = BriVL(cfg, vocab_size=50).train()
    model = parallelize_towers(copy.deepcopy(reference), 2, groups.tp_rank, groups.tp_group)
    split = [n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)]
    assert any(".query." in n for n in split) and any("attn.qkv" in n for n in split) and any("head.fc1" in n
                                                                                                for n in split)
    batch = random_batch()
    weights = torch.randn(2, 3, cfg.embed_dim, generator=torch.Generator().manual_seed(3))
    outputs = {}
    for name, m in (("tp1", reference), ("tp2", model)):
        image, text = m(batch)
        ((image * weights[0]).sum() + (text * weights[1]).sum()).backward()
        outputs[name] = (image.detach(), text.detach())
    torch.testing.assert_close(outputs["tp2"], outputs["tp1"], rtol=1e-5, atol=1e-6)
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in reference.named_parameters()}
    expected = sliced_like(reference, grads, 2, groups.tp_rank, groups.tp_group)
    for name, p in model.named_parameters():
        if p.requires_grad:  # (timm's unused head norm has no gradient in either)
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert p.grad is None, name
    frozen = {n for n, p in reference.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("pretrained", [False, True])
def test_tp2_towers_equal_tp1_outputs_and_gradients(pretrained, tmp_path):
    """Random init, and a text encoder loaded from a `save_pretrained` directory (q, k, v split by whole heads)."""
    directory = ""
    if pretrained:
        from brivl_ds.models.text_tower import TextTower

        torch.manual_seed(5)
        cfg = small_model_config().text
        cfg.num_heads = 4
        TextTower(cfg, 24, vocab_size=50).encoder.save_pretrained(tmp_path / "bert")
        directory = str(tmp_path / "bert")
    run_distributed(_tp_worker, 2, directory)


def test_heads_must_split_over_tp():
    from brivl_ds.parallel.tensor_parallel import head_rows

    assert head_rows(8, 4, 2, 1, fused=3).tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
    with pytest.raises(ValueError, match="heads % TP"):
        head_rows(12, 3, 2, 0)
