#!/bin/sh
# Place the exported model on the models volume, atomically and at most once:
#   1. $SOURCE_DIR/$MODEL_NAME exists (k3s overlay: a hostPath holding the export) -> copy it;
#   2. otherwise download $MODEL_URL (tar.gz of the export directory) and check $MODEL_SHA256.
# The model becomes visible under $MODELS_DIR/$MODEL_NAME only once complete (rename), so a vLLM pod never sees a
# half-written directory.
set -eu
MODELS_DIR="${MODELS_DIR:-/models}"
SOURCE_DIR="${SOURCE_DIR:-/source}"
dest="$MODELS_DIR/$MODEL_NAME"
partial="$MODELS_DIR/.$MODEL_NAME.partial"

if [ -f "$dest/config.json" ]; then
  echo "model-placement: $dest already present"
  exit 0
fi
archive="$MODELS_DIR/.$MODEL_NAME.tar.gz"
# A failed copy, download or checksum leaves nothing behind on the volume (a 2.6 GB archive, a partial directory).
trap 'rm -rf "$partial" "$archive"' EXIT
rm -rf "$partial"
mkdir -p "$partial"
if [ -d "$SOURCE_DIR/$MODEL_NAME" ]; then
  echo "model-placement: copying $SOURCE_DIR/$MODEL_NAME"
  cp -R "$SOURCE_DIR/$MODEL_NAME/." "$partial/"
else
  echo "model-placement: downloading $MODEL_URL"
  curl -fsSL --retry 3 -o "$archive" "$MODEL_URL"
  echo "$MODEL_SHA256  $archive" | sha256sum -c -
  tar -xzf "$archive" -C "$partial" --strip-components=1
  rm -f "$archive"
fi
for required in config.json model.safetensors tokenizer.json; do
  if [ ! -f "$partial/$required" ]; then
    echo "model-placement: $required missing from the export (run python -m mla_components.export)" >&2
    rm -rf "$partial"
    exit 1
  fi
done
rm -rf "$dest"  # an incomplete leftover (no config.json)
mv "$partial" "$dest"
echo "model-placement: placed $dest"
