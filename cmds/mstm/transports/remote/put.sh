# Create one small file atomically: a hidden temporary name, then rename.
#   sh -c <this> sh <directory> <name>, the content on stdin.
cd -- "$1" || exit 3
umask 027
t=".$2.tmp.$$"
cat > "$t" && mv -f -- "$t" "$2" || { rm -f -- "$t"; exit 1; }
