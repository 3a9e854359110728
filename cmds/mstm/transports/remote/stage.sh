# stage.py without python3 at the target (POSIX sh and GNU find/coreutils):
#   sh -c <this> sh <target_dir> open|publish|discard <batch>
# Its checks are by path: between its `[ -L ]` test of a component and the `mv`/`mkdir`
# that uses it, a component swapped for a symbolic link (by the remote user or root at
# the target, the only ones who can write there) would be followed.  stage.py has no
# such window.
S=.mstm-staging
if [ "$2" = open ]; then mkdir -p -- "$1" || exit 3; fi
cd -- "$1" || exit 3
case "$3" in ''|*[!0-9A-Za-z_-]*) [ "$2" = open ] || exit 4;; esac
case "$2" in
open)
  for d in .mstm-partial "$S"; do [ -L "$d" ] || mkdir -p -m 700 -- "$d"; done
  [ -L "$S" ] || find "$S" -mindepth 1 -maxdepth 1 -type d -mmin +1440 \
      -regextype posix-extended -regex "$S/[0-9]{8}T[0-9]{12}-[0-9a-f]{12}" -print0 |
    xargs -0 -r sh -c 'for d do
      [ -z "$(find "$d" -mmin -1440 -print -quit)" ] && rm -rf -- "$d"; done' sh
  ;;
discard)
  [ -L "$S" ] || rm -rf -- "$S/$3"
  ;;
publish)
  if [ -L "$S" ] || [ -L "$S/$3" ]; then exit 3; fi
  t=$(mktemp) || exit 3
  trap 'rm -f "$t"' EXIT
  xargs -0 -r sh -c '
  s=$1 t=$2; shift 2
  onway() {  # a link, or a non-directory, among the existing components of $1
    p=""; r=$1
    while [ -n "$r" ]; do
      case $r in */*) c=${r%%/*}; r=${r#*/};; *) c=$r; r="";; esac
      p=${p:+$p/}$c
      if [ -L "$p" ] || { [ -e "$p" ] && [ ! -d "$p" ]; }; then return 0; fi
    done
    return 1
  }
  for a do
    k=${a%"${a#?}"} n=${a#?}
    case "/$n/" in *//*|*/./*|*/../*) printf "E\0%s\0bad name\0" "$n"; continue;; esac
    d=$(dirname -- "$n")
    if [ "$d" != . ] && onway "$d"; then
      printf "E\0%s\0a link or a file on the way at the target\0" "$n"; continue; fi
    if [ "$k" = F ]; then
      if [ -L "$s/$n" ] || [ ! -f "$s/$n" ] || { [ -d "$n" ] && [ ! -L "$n" ]; }; then
        printf "E\0%s\0type conflict\0" "$n"; continue; fi
      chmod a-st -- "$s/$n" && mkdir -p -- "$d" && mv -T -f -- "$s/$n" "$n" &&
        printf "O\0%s\0\0" "$n" || printf "E\0%s\0cannot move into place\0" "$n"
      continue
    fi
    if [ -L "$n" ] || { [ -e "$n" ] && [ ! -d "$n" ]; } || [ -L "$s/$n" ] || [ ! -d "$s/$n" ]; then
      printf "E\0%s\0type conflict\0" "$n"; continue; fi
    (cd -- "$s" && find "./$n" \( -type d -printf "d%p\0" \) -o \
        \( \( -type f -o -type l \) -printf "f%p\0" \) -o -printf "x%p\0") > "$t"
    bad=$(xargs -0 -r -a "$t" sh -c "for e do k=\${e%\"\${e#?}\"} p=\${e#?}
      case \$k in
        d) if [ -L \"\$p\" ] || { [ -e \"\$p\" ] && [ ! -d \"\$p\" ]; }; then echo x; fi;;
        f) if [ -d \"\$p\" ] && [ ! -L \"\$p\" ]; then echo x; fi;;
        *) echo x;;
      esac; done" sh)
    if [ -n "$bad" ]; then printf "E\0%s\0type conflict\0" "$n"; continue; fi
    chmod -R a-st -- "$s/$n" && mkdir -p -- "$d" &&
    xargs -0 -r -a "$t" sh -c "s=\$1; shift; for e do k=\${e%\"\${e#?}\"} p=\${e#?}
      if [ \$k = d ]; then
        [ -d \"\$p\" ] || mkdir -m \"\$(stat -c %a -- \"\$s/\$p\")\" -- \"\$p\" || exit 255
      else mv -T -f -- \"\$s/\$p\" \"\$p\" || exit 255; fi; done" sh "$s" &&
      printf "O\0%s\0\0" "$n" || printf "E\0%s\0cannot move into place\0" "$n"
  done' sh "$S/$3" "$t"
  sync -f -- . 2>/dev/null || sync
  ;;
esac
echo MSTM-OK
