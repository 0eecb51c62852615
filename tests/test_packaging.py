"""Every package dir is listed in pyproject (wheels ship only listed packages)."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_dir_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = cfg["package-dir"]
    assert dirs == {"kimi_local": "kimi_local", "kimi_local.quant": "quant", "kimi_local.kernels": "kernels"}
    for pkg, d in dirs.items():
        assert pkg in listed
        for init in (ROOT / d).rglob("__init__.py"):
            sub = init.parent.relative_to(ROOT / d).parts
            assert ".".join((pkg, *sub)) in listed, f"{init.parent} is a package but not listed"
    # quant/ and kernels/ must not install as top-level packages
    assert "quant" not in listed and "kernels" not in listed


def test_installed_names_import():
    import kimi_local.kernels.naive  # noqa: F401
    import kimi_local.quant.hf_names  # noqa: F401
