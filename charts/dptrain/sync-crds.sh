#!/usr/bin/env bash
# Renders the repository's crds/*.yaml (generated from api/ by `make crds`) into Helm templates under
# templates/crds/: the same objects, wrapped in `{{- if .Values.crds.enabled }}`, with the annotation
# `helm.sh/resource-policy: keep` and the release labels added to metadata. Run it after `make crds`;
# tests/unit/test_chart.py fails while the chart's CRDs differ from crds/.
#
#   charts/dptrain/sync-crds.sh            # rewrite templates/crds/
#   charts/dptrain/sync-crds.sh --check    # exit 1 if templates/crds/ is out of date
set -euo pipefail
chart="$(cd "$(dirname "$0")" && pwd)"
source_dir="$chart/../../crds"
target_dir="$chart/templates/crds"
check=false
[ "${1:-}" = "--check" ] && check=true

render() {
  # Template delimiters in the source (e.g. in a description) are escaped so Helm prints them verbatim.
  awk -v src="crds/$(basename "$1")" '
    BEGIN {
      print "{{- /* Rendered from " src " by charts/dptrain/sync-crds.sh: do not edit, run the script. */}}"
      print "{{- if .Values.crds.enabled }}"
    }
    function escape(line) {
      gsub(/\{\{/, "{{`{{`}}", line); return line
    }
    function close_metadata() {
      if (!annotations) {
        print "  annotations:"
        print "    helm.sh/resource-policy: keep"
      }
      if (!labels) {
        print "  labels:"
        print "    {{- include \"dptrain.crdLabels\" . | nindent 4 }}"
      }
      in_metadata = 0
    }
    /^#/ && !started { print; next }
    { started = 1 }
    in_metadata && /^[^ ]/ { close_metadata() }
    /^metadata:[ ]*$/ { in_metadata = 1; print; next }
    in_metadata && /^  labels:[ ]*$/ {
      labels = 1; print
      print "    {{- include \"dptrain.crdLabels\" . | nindent 4 }}"
      next
    }
    in_metadata && /^  annotations:[ ]*$/ {
      annotations = 1; print
      print "    helm.sh/resource-policy: keep"
      next
    }
    { print escape($0) }
    END {
      if (in_metadata) close_metadata()
      print "{{- end }}"
    }
  ' "$1"
}

shopt -s nullglob
sources=("$source_dir"/*.yaml)
[ ${#sources[@]} -gt 0 ] || { echo "sync-crds.sh: no CRDs in $source_dir" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for crd in "${sources[@]}"; do
  render "$crd" >"$tmp/$(basename "$crd")"
done
if $check; then
  if ! diff -r "$tmp" "$target_dir" >/dev/null 2>&1; then
    echo "charts/dptrain/templates/crds is out of date with crds/: run charts/dptrain/sync-crds.sh" >&2
    exit 1
  fi
  exit 0
fi
rm -rf "$target_dir"
mkdir -p "$target_dir"
cp "$tmp"/*.yaml "$target_dir"/
echo "charts/dptrain/templates/crds: ${#sources[@]} CRD(s) from crds/"
