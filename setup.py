"""Build fastcbd and its extension fastcbd._C.

C++ sources (csrc/cpu, csrc/bindings.cpp) are always built. CUDA sources (csrc/cuda) are added when
nvcc is found (CUDA_HOME, else /usr/local/cuda) and torch is a CUDA build, unless FASTCBD_NO_CUDA=1.
FASTCBD_REQUIRE_CUDA=1 turns a missing nvcc or a CPU-only torch into an error instead of a quiet CPU-only
build (`make gpu-check` sets it). TORCH_CUDA_ARCH_LIST (default "8.0;9.0") and MAX_JOBS are honoured.

Install with `pip install --no-build-isolation -e .` so that the build uses the installed torch.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    if os.environ.get("FASTCBD_NO_CUDA", "0") == "1":
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    return None


def _extensions():
    cuda_home = _find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = cuda_home is not None and torch.version.cuda is not None
    if not with_cuda and os.environ.get("FASTCBD_REQUIRE_CUDA", "0") == "1":
        why = ("FASTCBD_NO_CUDA=1 is set" if os.environ.get("FASTCBD_NO_CUDA", "0") == "1"
               else "nvcc not found (set CUDA_HOME)" if cuda_home is None
               else f"torch {torch.__version__} is not a CUDA build")
        raise SystemExit(f"fastcbd: FASTCBD_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {why}")
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))) + [os.path.join("csrc", "bindings.cpp")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math"]
    include_dirs = [os.path.join(HERE, "csrc")]
    if with_cuda:
        cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        cu_sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        ext = CUDAExtension(
            "fastcbd._C",
            cpp_sources + cu_sources,
            include_dirs=include_dirs,
            define_macros=[("FASTCBD_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "fastcbd._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    print(f"fastcbd: building fastcbd._C with CUDA={'yes (' + cuda_home + ')' if with_cuda else 'no'}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastcbd",
    version="0.1.0",
    description="Fast Class-Balanced Distillation and long-tailed dataset distillation",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fastcbd", "fastcbd.*"]),
    package_data={"fastcbd": ["configs/*.yaml"]},
    python_requires=">=3.9",
    install_requires=["numpy", "torch", "torchvision", "mlxtend", "pyyaml", "tqdm", "matplotlib", "tensorboard"],
    extras_require={
        # the test extra carries the optional packages whose code paths the suite covers (make test installs it)
        "test": ["pytest", "hypothesis", "timm", "safetensors", "onnx", "onnxscript", "onnxruntime"],
        "dali": ["nvidia-dali-cuda130"],
        "timm": ["timm"],  # model.backbone=timm:<name>
        "export": ["safetensors", "onnx", "onnxscript", "onnxruntime"],  # fastcbd export --format safetensors / onnx
    },
    entry_points={"console_scripts": ["fastcbd=fastcbd.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
