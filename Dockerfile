# GPU training image: PyTorch with CUDA from the base image, the project on top.
#
#   docker build -t classifier-training .
#   # prepare the data on the host once (make data), then mount it and a folder for the runs:
#   docker run --gpus all --rm --shm-size=8g \
#       -v "$PWD/data:/app/data" -v "$PWD/runs:/app/runs" \
#       classifier-training --preset fashion-mnist --name demo
#
# --shm-size: DataLoader workers pass batches through shared memory, and Docker's default 64 MB is too small.
# Other scripts: docker run ... --entrypoint python classifier-training evaluate.py --help (or export.py,
# predict.py)
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# The base image's torch and torchvision already satisfy pyproject's ranges, so pip keeps them and adds
# only the small dependencies (torchmetrics, tyro, onnx, ...) instead of pulling a second CUDA build.
COPY . .
RUN pip install .

ENTRYPOINT ["python", "train.py"]
