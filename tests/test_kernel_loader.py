"""Where the CUDA loader finds the kernel sources and the CUDA headers (no GPU needed)."""
import pytest

from hpckfac.ops import cuda_module


def test_sources_are_found_from_the_checkout_or_the_package():
    assert cuda_module.source_names() == ["chol.cu", "pack.cu", "syrk.cu", "unitwise.cu"]
    assert "pack_sym" in cuda_module.source("pack.cu")
    assert (cuda_module.kernel_dir() / "common.cuh").is_file()


def fake_tree(root, layout):
    for folder, headers in layout.items():
        for header in headers:
            path = root / folder / header
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")


@pytest.fixture
def no_system_cuda(monkeypatch, tmp_path):
    """Only the fake pip tree under tmp_path/site/nvidia is searched."""
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(cuda_module, "_nvidia_roots", lambda: [tmp_path / "site" / "nvidia"])
    real = cuda_module.header_candidates

    def candidates(major=None):
        return [p for p in real(major) if str(p).startswith(str(tmp_path))]
    monkeypatch.setattr(cuda_module, "header_candidates", candidates)
    return tmp_path


ALL = ("cuda_fp16.h", "cuda_bf16.h", "mma.h", "crt/mma.h")


def test_cuda13_pip_layout(no_system_cuda):
    fake_tree(no_system_cuda / "site" / "nvidia", {"cu13/include": ALL, "cu12/include": ALL})
    dirs = cuda_module.include_dirs(13)
    assert dirs[0] == str(cuda_module.kernel_dir())
    assert dirs[1:] == [str(no_system_cuda / "site" / "nvidia" / "cu13" / "include")]


def test_cuda12_pip_layout_spread_over_packages(no_system_cuda):
    nvidia = no_system_cuda / "site" / "nvidia"
    fake_tree(nvidia, {"cuda_runtime/include": ("cuda_fp16.h", "cuda_bf16.h"),
                       "cuda_nvcc/include": ("mma.h", "crt/mma.h")})
    assert cuda_module.include_dirs(12)[1:] == [str(nvidia / "cuda_runtime" / "include"),
                                                str(nvidia / "cuda_nvcc" / "include")]


def test_system_toolkit_through_cuda_path(no_system_cuda, monkeypatch):
    toolkit = no_system_cuda / "toolkit"
    fake_tree(toolkit, {"include": ALL})
    monkeypatch.setenv("CUDA_PATH", str(toolkit))
    assert cuda_module.include_dirs(12)[1:] == [str(toolkit / "include")]


def test_a_missing_header_is_named(no_system_cuda):
    fake_tree(no_system_cuda / "site" / "nvidia", {"cu13/include": ("cuda_fp16.h", "cuda_bf16.h", "mma.h")})
    with pytest.raises(cuda_module.KernelBuildError, match=r"CUDA header crt/mma\.h not found"):
        cuda_module.include_dirs(13)


# What cupy-cudaXXx[ctk] installs: the runtime's headers, without crt/mma.h.
CTK_LAYOUT = {12: {"cuda_runtime/include": ALL[:3]}, 13: {"cu13/include": ALL[:3]}}


@pytest.mark.parametrize("major, package", [(12, "nvidia-cuda-nvcc-cu12"), (13, "nvidia-cuda-crt")])
def test_a_missing_header_names_its_pip_package(no_system_cuda, monkeypatch, major, package):
    fake_tree(no_system_cuda / "site" / "nvidia", CTK_LAYOUT[major])
    monkeypatch.setattr(cuda_module, "_nvrtc_version", lambda: (major, 0))
    with pytest.raises(cuda_module.KernelBuildError,
                       match=rf"crt/mma\.h not found .*pip install '{package}=={major}\.0\.\*'"):
        cuda_module.include_dirs(major)


def test_a_missing_header_without_nvrtc_names_both_packages(no_system_cuda, monkeypatch):
    fake_tree(no_system_cuda / "site" / "nvidia", CTK_LAYOUT[13])
    monkeypatch.setattr(cuda_module, "_nvrtc_version", lambda: None)
    with pytest.raises(cuda_module.KernelBuildError, match="nvidia-cuda-nvcc-cu12 .*nvidia-cuda-crt"):
        cuda_module.include_dirs(None)


def test_module_code_changes_with_the_included_header(monkeypatch, tmp_path):
    # CuPy's on-disk cache keys a binary by the code string only: an edit of common.cuh must
    # change the code of every source that includes it, or the old binary is loaded.
    for name in cuda_module.source_names() + ["common.cuh"]:
        (tmp_path / name).write_text(cuda_module.source(name), encoding="utf-8")
    monkeypatch.setattr(cuda_module, "kernel_dir", lambda: tmp_path)
    before = {name: cuda_module.module_code(name) for name in cuda_module.source_names()}
    assert all(code.startswith(cuda_module.source(name)) for name, code in before.items())
    assert before == {name: cuda_module.module_code(name) for name in cuda_module.source_names()}
    (tmp_path / "common.cuh").write_text(cuda_module.source("common.cuh") + "\n// edited\n", encoding="utf-8")
    after = {name: cuda_module.module_code(name) for name in cuda_module.source_names()}
    assert all(after[name] != before[name] for name in before)
