# imagesieve's serving and scoring image: the REST API and the app over a workspace volume.
#
#   docker build -t imagesieve .                       (or: podman build --format docker ...)
#   docker run -p 7860:7860 -v imagesieve:/workspace \
#       -e IMAGESIEVE_API_TOKEN=... -e IMAGESIEVE_AUTH=user:password imagesieve
#
# The slim install: no torch (training, Grad-CAM and evaluation reports need the full install,
# `pip install "imagesieve[train]"`, outside the image); bring a trained model in the workspace.
# BASE: any Debian or Ubuntu image with python3 (>= 3.11) and its venv module.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install --yes --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md constraints.txt /src/
COPY imagesieve /src/imagesieve
# Kept to what serving runs (~850 MB, from 1.3 GB as pip leaves it): no pip cache, no pip or
# setuptools, no test suites of the packages, the packages' own shared libraries stripped of
# what only a debugger reads (as Debian ships libraries; not the ones wheels vendor in *.libs/,
# which patchelf rewrote and strip would break), and bytecode written only for the modules one
# import of the serving path loads.
RUN python3 -m venv /opt/imagesieve \
    && /opt/imagesieve/bin/pip install --no-cache-dir --no-compile -c /src/constraints.txt /src \
    && /opt/imagesieve/bin/pip uninstall --yes setuptools pip \
    && find /opt/imagesieve -depth -type d -name tests -exec rm -rf {} + \
    && find /opt/imagesieve -type f \( -name "*.so" -o -name "*.so.*" \) -not -path "*.libs/*" \
        -exec strip --strip-unneeded {} + \
    && PYTHONDONTWRITEBYTECODE= NUMBA_CACHE_DIR=/opt/imagesieve/numba /opt/imagesieve/bin/python -c \
        "import imagesieve.cli, imagesieve.app.ui, imagesieve.search, imagesieve.ingest, umap, hdbscan; \
from imagesieve.classifier import compile_quality; compile_quality()"

FROM ${BASE}
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/imagesieve imagesieve \
    && mkdir /workspace && chown imagesieve:imagesieve /workspace
COPY --from=build /opt/imagesieve /opt/imagesieve
# numba's cache: photo quality's kernel compiled at build time (else ~8 s at the first image),
# and room for what UMAP compiles when it first runs.
COPY --from=build --chown=imagesieve:imagesieve /opt/imagesieve/numba /opt/imagesieve/numba
ENV PATH=/opt/imagesieve/bin:$PATH \
    IMAGESIEVE_WORKSPACE=/workspace \
    NUMBA_CACHE_DIR=/opt/imagesieve/numba \
    PYTHONUNBUFFERED=1
USER imagesieve
WORKDIR /home/imagesieve
VOLUME /workspace
EXPOSE 7860
# The probe calls the API's health with the token the server reads too: $IMAGESIEVE_API_TOKEN
# (SECRET or NAME=SECRET) or the file $IMAGESIEVE_API_TOKEN_FILE names (a mounted secret).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-m", "imagesieve._access"]
# The server closes the store and exits 0 on SIGTERM (docker stop, podman stop).
STOPSIGNAL SIGTERM
ENTRYPOINT ["imagesieve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "7860"]
