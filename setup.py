"""Builds dpfast and its one compiled extension, dpfast._C.

The CUDA variant is built when torch was built with CUDA and nvcc is found,
whether or not a GPU is visible (so a CPU-only CI machine still compiles the
CUDA code). DPFAST_FORCE_CUDA=1 / DPFAST_SKIP_CUDA=1 override the choice.
TORCH_CUDA_ARCH_LIST is honoured; without it and without a visible GPU the
default is sm_80 and sm_90 (A100 and H100/H200).
"""

import glob
import os
import sys

from setuptools import find_packages, setup


def _find_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; where that nvcc is a link or a
    wrapper script in /usr/local/bin, the guess (/usr/local) has no CUDA
    headers. Pick a folder that has them."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import shutil

    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
                os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


_find_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def want_cuda():
    if env_flag("DPFAST_SKIP_CUDA"):
        return False, "DPFAST_SKIP_CUDA is set"
    if env_flag("DPFAST_FORCE_CUDA"):
        return True, "DPFAST_FORCE_CUDA is set"
    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    if CUDA_HOME is None:
        return False, "nvcc was not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} has CUDA {torch.version.cuda}, nvcc found under {CUDA_HOME}"


def extra_cuda_includes():
    """Headers that torch's headers include but a bare CUDA toolkit may lack
    (cuSPARSE and friends) ship in torch's own nvidia-* wheels."""
    found = []
    for entry in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            found.extend(d for d in glob.glob(os.path.join(entry, pattern)) if os.path.isdir(d))
    return sorted(set(found))


# NOTE [One libstdc++]: torch and every extension must share the process's libstdc++. A compiler
# wrapper that links it statically (seen on a GPU image whose CXX adds -static-libstdc++) gives the
# extension a second copy whose locale facets do not match the stream objects made by the first:
# the first TORCH_CHECK message that prints a number crashed (H100 machine, 2026-11-27) or came
# out cut short. The GPU image's g++ is a wrapper whose -B folder holds only libstdc++.a, so a
# "-lstdc++" finds the archive there (H200 machine, 2026-11-27). So the link names, by its path, the
# shared libstdc++ that this process (torch imported) has loaded, before the driver's own
# libraries: every symbol is then found in it and nothing is taken from an archive. The build is
# refused if a copy got in anyway (carries_own_libstdcxx).


def loaded_libstdcxx():
    """The path of the shared libstdc++ this process has loaded (torch loads it), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.rstrip("\n").split(maxsplit=5)  # the path, last, may hold spaces
                if len(fields) < 6:
                    continue
                path = fields[5].removesuffix(" (deleted)")
                if (os.path.basename(path).startswith("libstdc++.so") and os.path.isabs(path)
                        and os.path.isfile(path)):
                    return path
    except OSError:
        pass
    return None


if sys.platform.startswith("linux"):
    LINK_SHARED_LIBSTDCXX = [loaded_libstdcxx() or "-lstdc++"]
else:
    LINK_SHARED_LIBSTDCXX = []


def carries_own_libstdcxx(library):
    """True if the built library carries a copy of libstdc++: it does not load the shared one
    (readelf -d), or it exports libstdc++'s own std::locale::classic() (nm -D). None where that
    cannot be told (not Linux, or binutils missing or failing)."""
    import shutil
    import subprocess

    readelf, nm = shutil.which("readelf"), shutil.which("nm")
    if readelf is None or nm is None or not sys.platform.startswith("linux"):
        return None
    needed = subprocess.run([readelf, "-d", library], capture_output=True, text=True)
    exported = subprocess.run([nm, "-D", "--defined-only", library], capture_output=True, text=True)
    if needed.returncode != 0 or exported.returncode != 0:
        print(f"dpfast: could not check which libstdc++ {library} uses: {needed.stderr}{exported.stderr}".strip())
        return None
    exports_locale = any(word.split("@")[0] == "_ZNSt6locale7classicEv" for word in exported.stdout.split())
    return "libstdc++.so" not in needed.stdout or exports_locale


class BuildWithOneLibstdcxx(BuildExtension.with_options(use_ninja=True)):
    def build_extension(self, ext):
        super().build_extension(ext)
        path = self.get_ext_fullpath(ext.name)
        if carries_own_libstdcxx(path):
            raise RuntimeError(
                f"dpfast: {path} carries its own copy of libstdc++ (the compiler {os.environ.get('CXX', 'c++')} "
                "links it statically), which crashes on the first error message it formats (NOTE [One libstdc++] "
                "in setup.py). Rebuild with a compiler that links libstdc++ dynamically, e.g. CXX=/usr/bin/g++ "
                "CC=/usr/bin/gcc.")


def extension():
    with_cuda, reason = want_cuda()
    print(f"dpfast: building the {'CUDA' if with_cuda else 'CPU'} variant of dpfast._C ({reason})")
    sources = [
        "csrc/plan.cpp", "csrc/comm.cpp", "csrc/autograd_ops.cpp", "csrc/grad_ready.cpp", "csrc/bindings.cpp"
    ]
    cxx_flags = ["-O3"]  # the C++ standard is the one torch asks for
    if not with_cuda:
        return CppExtension("dpfast._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=LINK_SHARED_LIBSTDCXX)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    sources += ["csrc/cuda/comm_cuda.cpp", "csrc/cuda/add_kernel.cu"]
    return CUDAExtension(
        "dpfast._C",
        sources,
        # The toolkit's own headers first; torch's nvidia wheels only fill its gaps.
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(CUDA_HOME, "include")] + extra_cuda_includes(),
        define_macros=[("DPFAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-DDPFAST_WITH_CUDA=1"]},
        extra_link_args=LINK_SHARED_LIBSTDCXX,
    )


setup(
    name="dpfast",
    version="0.1.0",
    description="A drop-in, faster torch.nn.DataParallel with persistent replicas and tree reductions",
    packages=find_packages(include=["dpfast", "dpfast.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithOneLibstdcxx},
    python_requires=">=3.9",
    install_requires=["torch", "nvidia-ml-py"],
)
