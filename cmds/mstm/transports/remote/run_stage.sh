# Runs stage.py when the target has python3, else stage.sh; stdin is kept in a file
# first so that either reads it whole.
#   sh -c <this> sh <target_dir> <mode> <batch> <stage.py's text> <stage.sh's text>
i=$(mktemp) || exit 3
trap 'rm -f "$i"' EXIT
cat > "$i"
if command -v python3 >/dev/null 2>&1; then
  python3 -I -c "$4" "$1" "$2" "$3" < "$i"
  exit $?
fi
sh -c "$5" sh "$1" "$2" "$3" < "$i"
