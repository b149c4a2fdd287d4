"""The README's promises that are cheap to check: CI runs its test command verbatim; its commands exist."""
import re

from conftest import REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(pip install .*?)\n```", text)


def test_ci_runs_the_readme_test_command():
    main_job, tests = readme_commands()
    assert "deepspeed --num_gpus 2 brivl_ds/train.py --preset tiny" in main_job
    assert tests.endswith("python -m pytest")
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def test_hostfile_describes_the_papers_cluster():
    lines = [l.split() for l in (REPO / "hostfiles" / "a100").read_text().splitlines() if l.strip()]
    assert len(lines) == 16 and all(slots == "slots=8" for _, slots in lines)
    assert len({host for host, _ in lines}) == 16


def test_preset_table_matches_the_presets():
    """Every row of the README's preset table: image size, D, K, tau, m, batch and the parameter count printed by
    `python -m brivl_ds.presets NAME` (built on the meta device)."""
    from brivl_ds.config import PRESETS, get_preset
    from brivl_ds.presets import parameter_report

    text = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `([\w-]+)`[^|]*\| (\S+) @(\d+) \|[^|]*\| ([\d,]+) \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \| "
                      r"(\d+) / rank[^|]*\| ([\d,.]+) M \|$", text, flags=re.M)
    assert sorted(r[0] for r in rows) == sorted(PRESETS)
    for name, backbone, size, dim, k, tau, m, batch, params in rows:
        cfg = get_preset(name)
        image = cfg.model.image
        assert image.backbone.split(".")[0].startswith(backbone.removesuffix("_ns")), name
        assert (image.image_size, cfg.model.embed_dim, cfg.moco.queue_size) == \
            (int(size), int(dim.replace(",", "")), int(k.replace(",", ""))), name
        assert (cfg.moco.tau_init, cfg.moco.momentum, cfg.data.batch_size) == (float(tau), float(m), int(batch)), name
        assert f"{parameter_report(name)['total'] / 1e6:,.1f}" == params, name


def test_tensor_parallel_table_matches_the_split_plan():
    from brivl_ds.presets import tensor_parallel_report

    text = (REPO / "README.md").read_text()
    rows = {int(tp): cells for tp, *cells in re.findall(
        r"^\| (\d) \| (?:[^|]*: )?([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) MiB \| ([\d.]+) MiB \| ([\d.]+) MiB \|$",
        text, re.M)}
    assert sorted(rows) == [1, 2, 4, 8]
    report = {vocab: (tensor_parallel_report("paper-1b", [f"parallel.vocab_parallel={vocab}"]),
                      tensor_parallel_report("paper-1b", [f"parallel.vocab_parallel={vocab}",
                                                          "model.image.num_heads=16"])) for vocab in (False, True)}
    assert isinstance(report[False][0][8], str) and "4 heads" in report[False][0][8]
    mib = lambda n: f"{n * 2 / 2 ** 20:.1f}"  # noqa: E731 (bf16 bytes)
    for tp, cells in rows.items():
        plain, vocab = (report[v][0][tp] if tp < 8 else report[v][1][tp] for v in (False, True))
        assert cells == [f"{plain['image']:,}", f"{plain['text']:,}", f"{vocab['text']:,}", mib(plain["image"]),
                         mib(plain["text"]), mib(vocab["text"])], tp
