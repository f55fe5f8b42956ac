"""keras_sketch: memory-efficient Keras optimizers with count-sketch state."""

from setuptools import find_packages, setup

setup(
    name="keras_sketch",
    version="0.1.0",
    description="Count-sketch compressed optimizer state for Keras 3 / TensorFlow",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_sketch", "keras_sketch.*"]),
    python_requires=">=3.10",
    install_requires=["tensorflow==2.21.0", "keras==3.15.1", "numpy>=1.26,<2.5"],
    extras_require={
        "test": ["pytest==8.3.5", "matplotlib==3.10.7", "tensorflow-datasets==4.9.10",
                 "importlib_resources==6.5.2", "psutil==7.1.3"],
    },
)
