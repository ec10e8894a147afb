import json

from hf_effllm.benchmarking import BenchmarkRun, environment_info, markdown_table, module_setting, time_ms


def test_time_ms_cpu_median_is_positive():
    ms = time_ms(lambda: sum(range(1000)), warmup=1, rep=5, device="cpu")
    assert 0 < ms < 100


def test_markdown_table():
    table = markdown_table([{"a": 1, "b": 2.5}, {"a": 3, "c": "x"}])
    assert table.splitlines()[0] == "| a | b | c |"
    assert table.splitlines()[2] == "| 1 | 2.500 |  |"


def test_run_writes_json_and_md(tmp_path):
    run = BenchmarkRun("probe", "what it measures", results_dir=tmp_path)
    run.meta["shape"] = "tiny"
    run.add(op="x", ms=1.25, ratio=2.0)
    js, md = run.write()
    payload = json.loads(js.read_text())
    assert payload["rows"] == [{"op": "x", "ms": 1.25, "ratio": 2.0}]
    assert payload["device"]["type"] in ("cpu", "cuda") and payload["versions"]["torch"]
    assert "| op | ms | ratio |" in md.read_text() and "shape: tiny" in md.read_text()


def test_environment_info_has_date_and_versions():
    env = environment_info()
    assert env["date"].endswith("Z") and env["versions"]["transformers"]


def test_module_setting_restores_the_previous_values_also_on_an_error():
    import types

    mod = types.SimpleNamespace(TILE="interleaved", TIMES=[1], XT=False)
    with module_setting(mod, TILE="lane", XT=True):
        assert (mod.TILE, mod.XT, mod.TIMES) == ("lane", True, [1])
    assert (mod.TILE, mod.XT) == ("interleaved", False)
    try:
        with module_setting(mod, TIMES=[2]):
            assert mod.TIMES == [2]
            raise KeyError("inside")
    except KeyError:
        pass
    assert mod.TIMES == [1]


def test_rel_err_in_fp32_and_against_a_zero_reference():
    import torch

    from hf_effllm.benchmarking import rel_err

    ref = torch.tensor([3.0, 4.0], dtype=torch.float16)
    assert rel_err(torch.tensor([3.0, 4.0], dtype=torch.bfloat16), ref) == 0.0
    assert abs(rel_err(torch.tensor([3.0, 5.0]), ref) - 0.2) < 1e-7  # ||(0, 1)|| / ||(3, 4)||
    assert rel_err(torch.zeros(2), torch.zeros(2)) == 0.0
    assert rel_err(torch.ones(2), torch.zeros(2)) > 1e29  # large, not nan or inf
