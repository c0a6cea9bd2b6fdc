"""Every CUDA source in kernels/ compiles with NVRTC, as the runtime loader
(hpckfac.ops.cuda_module) hands it to CuPy, for sm_80 and sm_90, and every name
expression resolves. NVRTC needs no GPU: this runs wherever CuPy, its NVRTC library and
the CUDA headers are installed, and skips otherwise (as on the CPU-only CI machine).

CuPy's own compile path (``RawModule`` -> ``compile_with_cache``) looks up the device's
architecture before it calls NVRTC, so without a GPU it cannot be called; this test calls
CuPy's NVRTC binding with the options that path passes: CuPy's include folders around the
loader's ``options()`` (``assemble_cupy_compiler_options``), then ``-ftz=true``, the
architecture and ``--device-as-default-execution-space``. The code is ``module_code(file)``
and the name expressions ``name_expressions(file, arch)``, as in ``cuda_module.module``."""
import re

import pytest

from hpckfac.ops import cuda_module

cupy = pytest.importorskip("cupy")

ARCHS = (80, 90)


@pytest.fixture(scope="module")
def nvrtc():
    try:
        binding = cupy.cuda.nvrtc
        binding.getVersion()
    except Exception as exc:  # no NVRTC library
        pytest.skip(f"NVRTC not available: {exc}")
    return binding


@pytest.fixture(scope="module")
def loader_options(nvrtc):
    try:
        return cuda_module.options()
    except cuda_module.KernelBuildError as exc:
        pytest.skip(f"CUDA headers not found: {exc}")


def cupy_options(loader_options: tuple[str, ...], arch: int) -> tuple[str, ...]:
    """The options CuPy's RawModule passes to NVRTC for ``loader_options`` on ``arch``
    (as PTX, which CuPy also produces under CUPY_COMPILE_WITH_PTX=1, so that it can be read)."""
    assemble = getattr(cupy._core.core, "assemble_cupy_compiler_options", None)
    options = assemble(tuple(loader_options)) if assemble is not None else tuple(loader_options)
    return options + ("-ftz=true", f"-arch=compute_{arch}", "--device-as-default-execution-space")


def compile_ptx(nvrtc, file: str, arch: int, options: tuple[str, ...]):
    """(PTX, lowered name of each name expression, NVRTC's log) of ``file`` for ``arch``."""
    names = cuda_module.name_expressions(file, arch)
    prog = nvrtc.createProgram(cuda_module.module_code(file), f"{file}", (), ())
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError:
            pytest.fail(f"NVRTC rejected {file} for sm_{arch}:\n{nvrtc.getProgramLog(prog)}")
        lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
        ptx = nvrtc.getPTX(prog)
        return (ptx.decode() if isinstance(ptx, bytes) else ptx), lowered, nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("file", cuda_module.source_names())
def test_source_compiles_with_nvrtc_as_the_loader_asks(nvrtc, loader_options, file, arch):
    ptx, lowered, log = compile_ptx(nvrtc, file, arch, cupy_options(loader_options, arch))
    assert "warning" not in log.lower(), log
    assert all(lowered.values()), lowered
    # Template instantiations are weak entries, syrk_finish a visible one.
    entries = re.findall(r"^\.(?:visible|weak)\s+\.entry\s+(\S+?)\(", ptx, flags=re.M)
    assert sorted(entries) == sorted(lowered.values())
    # float <-> double casts keep subnormals under CuPy's -ftz=true (hk::widen / hk::narrow).
    assert not re.findall(r"cvt(?:\.rn)?\.ftz\.f(?:64\.f32|32\.f64)\b", ptx)
    if file == "syrk.cu":
        # The half-precision kernels use tensor cores on both architectures.
        assert "wmma.mma.sync" in ptx
