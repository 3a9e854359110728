# Wait (up to $3 looks: 10 ms apart for the first 20, then 50 ms -- rsync_ssh's
# `_looks`) for a file to appear; print at most $4 bytes of it.
#   sh -c <this> sh <directory> <name> <looks> <max bytes>
cd -- "$1" 2>/dev/null || exit 3
n=0
while [ ! -e "$2" ]; do
  n=$((n+1)); [ "$n" -gt "$3" ] && exit 4
  if [ "$n" -le 20 ]; then sleep 0.01; else sleep 0.05; fi
done
head -c "$4" -- "$2"
