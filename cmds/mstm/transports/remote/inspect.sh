# rsync_ssh's inspect, one round trip per batch:
#   sh -c <this> sh <directory> <hasher.py's text>, the names NUL-separated on stdin.
# First the target filesystem is made durable (one syncfs: rsync never fsyncs, and the
# sender may delete the source as soon as we answer); then sizes, the split mark, and
# sha256 of each regular file ("digest  name", NUL-terminated, as coreutils' -z prints
# it).  A failed syncfs (a writeback error) answers nothing at all: exit 7.  The hashes
# come from hasher.py (hashlib: OpenSSL, SHA extensions, 3-4x coreutils here) where the
# target has Python, else from coreutils.
cd -- "$1" || exit 3
t=$(mktemp) || exit 3
trap 'rm -f "$t"' EXIT
cat > "$t"
if ! e=$(LC_ALL=C sync -f -- . 2>&1); then
  case "$e" in
    *option*|*operand*|*sage*) sync ;;
    *) printf '%s\n' "$e" >&2; exit 7 ;;
  esac
fi
if command -v python3 >/dev/null 2>&1 && python3 -I -c "$2" "$t" 2>/dev/null; then
  exit 0
fi
xargs -0 -r -a "$t" stat --printf='%s %n\0' -- 2>/dev/null
printf '%s\0' '--mstm-split--'
xargs -0 -r -a "$t" sha256sum -z -- 2>/dev/null
exit 0
