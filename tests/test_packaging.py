"""A non-editable build ships the CUDA sources inside the package (hpckfac/kernels)."""
import glob
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_ships_the_cuda_sources(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), ROOT], check=True, capture_output=True, text=True,
                   cwd=str(tmp_path))
    wheels = glob.glob(str(tmp_path / "hpckfac-*.whl"))
    assert len(wheels) == 1, wheels
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    sources = {os.path.basename(p) for ext in ("cu", "cuh")
               for p in glob.glob(os.path.join(ROOT, "kernels", f"*.{ext}"))}
    shipped = {os.path.basename(n) for n in names
               if n.startswith("hpckfac/kernels/") and n.endswith((".cu", ".cuh"))}
    assert "hpckfac/kernels/__init__.py" in names
    assert shipped == sources
    assert {"hpckfac/comm/communicator.py", "hpckfac/comm/ring.py"} <= names
