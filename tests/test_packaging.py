import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_folder_is_hf_effllm_kernels():
    mod = importlib.import_module("hf_effllm.kernels")
    assert Path(mod.__file__).resolve().parent == ROOT / "kernels"


def test_no_top_level_kernels_module_installed(tmp_path):
    # Run outside the source tree: there the current folder would make `kernels/` importable.
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    origin = out.stdout.strip()
    assert origin == "None" or Path(origin).resolve().parent != ROOT / "kernels"


def test_setup_maps_every_subpackage():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import runpy, setuptools, json; setuptools.setup = lambda **kw: print(json.dumps(kw)); runpy.run_path('setup.py')",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    import json

    kw = json.loads(out.stdout)
    assert "kernels" not in kw["packages"]
    assert "hf_effllm.kernels" in kw["packages"] and kw["package_dir"]["hf_effllm.kernels"] == "kernels"
    assert "hf_effllm.hub_cards" in kw["packages"]
    real = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "hf_effllm").rglob("__init__.py")}
    assert real <= set(kw["packages"])


def test_hub_card_templates_are_package_data():
    import importlib.resources

    assert importlib.resources.files("hf_effllm.hub_cards").joinpath("quickstart.md").is_file()
