# tagger: catalog auto-tagging worker image (CPU).
#   docker build -t tagger .
#   docker run --rm tagger --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first and on its own layer: it is by far the largest download and changes least often, so code edits
# do not re-download it. The CPU index avoids ~2 GB of CUDA libraries the default PyPI wheel pulls in.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY . .
# A regular (non-editable) install: the image runs the installed package, not the build context.
# Migrations are not package data: `tagger migrate` finds them in its working directory, /app.
RUN pip install . \
    && mkdir -p /app/taxonomies /app/data /images \
    && cp -r taxonomies/. /app/taxonomies/ \
    && cp -r migrations alembic.ini /app/

# Never run as root: the worker decodes untrusted images fetched from the network.
RUN useradd --create-home --uid 10001 --user-group tagger \
    && chown -R tagger:tagger /app/data
USER tagger
WORKDIR /app

# Defaults for a bare `docker run`; docker-compose.yml sets them all explicitly. The taxonomies baked in here are
# a fallback: compose mounts ./taxonomies over /app/taxonomies so merchandisers can edit them without a rebuild.
ENV TAGGER_DATA_DIR=/app/data \
    TAGGER_TAXONOMY_DIR=/app/taxonomies \
    TAGGER_DEVICE=cpu

ENTRYPOINT ["tagger"]
CMD ["--help"]
