"""Every CUDA source in kernels/ compiles with nvcc for sm_80 and sm_90, with the
options and template instantiations the runtime loader (hpckfac.ops.cuda_module)
asks NVRTC for. Needs nvcc only (no GPU); skipped where nvcc is absent."""
import re
import shutil
import subprocess

import pytest

import hpckfac.kernels as kernel_sources
from hpckfac.ops import cuda_module

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

ARCHS = (80, 90)


def compile_ptx(tmp_path, file: str, arch: int) -> str:
    """PTX of ``file`` with the loader's instantiations for ``arch``, built by nvcc."""
    expressions = cuda_module.name_expressions(file, arch)
    # Taking each kernel's address instantiates it, as NVRTC's name expressions do.
    unit = tmp_path / f"instantiate_{arch}_{file}"
    unit.write_text(
        f'#include "{file}"\n'
        "static void* const hpckfac_kernels[] = {\n"
        + "".join(f"    (void*)&{expr},\n" for expr in expressions)
        + "};\n"
        "void* hpckfac_kernel(int i) { return hpckfac_kernels[i]; }\n"
    )
    ptx = tmp_path / f"{file}.{arch}.ptx"
    include = [f"-I{cuda_module.include_dirs()[0]}"]
    cmd = [NVCC, *cuda_module.BASE_OPTIONS, *include, f"-arch=sm_{arch}", "--ptx",
           "-Werror", "all-warnings", str(unit), "-o", str(ptx)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    return ptx.read_text()


def test_every_source_is_listed():
    for file in kernel_sources.names():
        assert cuda_module.name_expressions(file, 90)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("file", kernel_sources.names())
def test_source_compiles_with_loader_instantiations(tmp_path, file, arch):
    ptx = compile_ptx(tmp_path, file, arch)
    entries = re.findall(r"^\.(?:visible\s+)?\.entry\s+(\S+?)\(", ptx, flags=re.M)
    assert len(entries) == len(cuda_module.name_expressions(file, arch))
    if file == "syrk.cu":
        # The half-precision kernels really use tensor cores.
        assert "wmma.mma.sync" in ptx or "mma.sync" in ptx


def test_tensor_core_paths_follow_architecture():
    assert cuda_module.syrk_name("float16", 90) == "syrk_wmma<__half>"
    assert cuda_module.syrk_name("bfloat16", 80) == "syrk_wmma<__nv_bfloat16>"
    assert cuda_module.syrk_name("bfloat16", 75) == "syrk_fma<__nv_bfloat16>"
    assert cuda_module.syrk_name("float32", 90) == "syrk_fma<float>"
    with pytest.raises(TypeError, match="int32"):
        cuda_module.ctype("int32")
