# Commands side by side on the one GPU, for the bench scripts (source it; OUT must be set). A job
# that decodes one token at a time leaves the GPU mostly idle, so several run at once: each writes
# its own log under $OUT, and wait_all fails, naming the job and its last lines, if one of them did.
jobs=()
bg() {  # bg NAME COMMAND...: run COMMAND in the background, its output in $OUT/NAME.log
  local name=$1; shift
  "$@" > "$OUT/$name.log" 2>&1 &
  jobs+=("$!:$name")
}
wait_all() {  # wait for every job started since the last wait_all
  local failed=0 job
  for job in "${jobs[@]}"; do
    wait "${job%%:*}" || { echo "failed: ${job#*:}"; tail -n 3 "$OUT/${job#*:}.log"; failed=1; }
  done
  jobs=()
  return $failed
}
