"""fmh-engine: real-time fetal/maternal RBC classification beside a microfluidic chip."""
from setuptools import find_packages, setup

setup(
    name="fmh-engine",
    version="0.1.0",
    description="Acquisition-side SlowFast inference engine for FMH screening on the PolyNano chip",
    python_requires=">=3.11",
    packages=find_packages(include=["engine", "engine.*", "export", "export.*",
                                    "train", "train.*", "bench", "bench.*"]),
    package_data={"engine": ["data/*.onnx", "data/*.json"], "": ["*.yaml"]},
    data_files=[("configs", ["configs/default.yaml"])],
    install_requires=[
        "numpy>=1.26",
        "numba>=0.60",                   # fused, GIL-free front-end kernels
        "opencv-python-headless>=4.9",   # video replay, reference front end
        "tifffile>=2024.1",              # lazy multipage TIFF replay and writing
        "h5py>=3.10",                    # HDF5 / RT-DC replay, clips.h5
        "hdf5plugin>=4",                 # RT-DC files are Zstandard-compressed (filter 32015)
        "pyarrow>=15",                   # tracks.parquet / cells.parquet
        "pyyaml>=6",                     # configs
        "pyzmq>=25",                     # clip transport
        "onnxruntime>=1.17",             # CPU inference backend
        "onnx>=1.15",                    # model metadata
        "scipy>=1.11",                   # reference labelling, statistics
        "tqdm>=4.66",                    # progress bars
        "psutil>=5.9",                   # memory/CPU accounting in benchmarks
        "matplotlib>=3.8",               # report figures
    ],
    extras_require={
        "train": ["torch>=2.2", "onnx>=1.15", "onnxscript>=0.1"],
        "gpu": ["tensorrt>=10", "pycuda>=2024.1", "onnxruntime-gpu>=1.17"],
        "camera": ["harvesters>=1.4"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "pandas>=2"],
    },
    entry_points={"console_scripts": ["fmh=engine.cli:main"]},
)
