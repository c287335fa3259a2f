#!/usr/bin/env bash
# Installs a CRIU that works on this machine's kernel, for lockstep's
# checkpoints (package checkpoint). Idempotent: when the installed build is
# this script's (same patch level) and passes `criu check`, it does nothing;
# when only the binary is gone, the cached build is installed again.
#
# Debian bookworm's criu (3.17) fails `criu check` on recent kernels
# ("Unexpected rt vDSO area bounds"). CRIU 4.x builds from the upstream
# tarball of the criu source package of Debian's next suite, so this script
#
#   1. adds that suite as deb-src ONLY, in a file of its own under
#      /etc/apt/sources.list.d/ (no binary package of the machine can be
#      upgraded by it), taking the mirror and key from the machine's own
#      Debian entry;
#   2. downloads the source with `apt-get source --download-only` (the
#      Debian packaging tarball may be missing on the mirror: only the
#      upstream .orig tarball is needed);
#   3. installs the build dependencies from the machine's own suite;
#   4. runs `make criu` (1 to 3 minutes on 2 cores) in a cache directory,
#      so that a second run reuses the binary;
#   5. installs the binary as /usr/local/sbin/criu and runs `criu check`.
#
# `criu check` passing is not enough here, so the build carries three small
# patches of its own (PATCHES below), and the installed binary is only
# taken as done when its stamp says it is that build:
#   - sockets.c: on Linux 6.16 and later CRIU 4.1.1 fails to dump any TCP
#     socket ("Can't get 1:16 opt: Operation not supported": the kernel now
#     refuses SO_PASSCRED/SO_PASSSEC on them);
#   - cr-dump.c: a task of another user (Apache's child, www-data) cannot be
#     dumped without CAP_SYS_RESOURCE ("Can't get rlimit 0: Operation not
#     permitted"), which this sandbox withholds even from root: its limits
#     are read from /proc/PID/limits instead;
#   - filesystems.c: a tmpfs is archived without gzip. It is archived while
#     the server is frozen, and gzip made that pause 90 s for MariaDB with
#     1 GiB of tables (830 MiB image); restore still reads gzipped images.
#
# Environment:
#   CRIU_SUITE     the newer Debian suite to take the source from (trixie)
#   LOCKSTEP_CACHE where the source and the build are kept (/var/cache/lockstep)
#   CRIU_FORCE=1   rebuild even if `criu check` passes
set -euo pipefail

SUITE=${CRIU_SUITE:-trixie}
CACHE=${LOCKSTEP_CACHE:-/var/cache/lockstep}/criu
DEST=/usr/local/sbin/criu
SRC_LIST=/etc/apt/sources.list.d/lockstep-criu-src.sources
# Bump when PATCHES change, so that every machine rebuilds.
PATCH_LEVEL=3
STAMP=$CACHE/installed.stamp

BUILD_DEPS=(
  build-essential pkg-config
  libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
  python3-protobuf libnl-3-dev libnet1-dev libcap-dev libbsd-dev
  libgnutls28-dev libnftables-dev libdrm-dev uuid-dev
  dpkg-dev xz-utils patch
)

# Our patches to the CRIU source, applied with patch -p1 in this order.
PATCHES=$(
  cat <<'EOF'
--- a/criu/sockets.c
+++ b/criu/sockets.c
@@ -637,6 +637,26 @@
 	return 0;
 }
 
+/*
+ * A boolean SOL_SOCKET option that the kernel may not support for this
+ * socket's family: *has says whether it was read.
+ */
+static int dump_opt_unless_unsupported(int sk, int name, int *val, protobuf_c_boolean *has)
+{
+	socklen_t len = sizeof(*val);
+
+	*val = 0;
+	*has = false;
+	if (getsockopt(sk, SOL_SOCKET, name, val, &len) < 0) {
+		if (errno == EOPNOTSUPP || errno == ENOPROTOOPT)
+			return 0;
+		pr_perror("Can't get %d:%d opt", SOL_SOCKET, name);
+		return -1;
+	}
+	*has = true;
+	return 0;
+}
+
 int dump_socket_opts(int sk, SkOptsEntry *soe)
 {
 	int ret = 0, val;
@@ -676,12 +696,11 @@
 	soe->so_reuseport = val ? true : false;
 	soe->has_so_reuseport = true;
 
-	ret |= dump_opt(sk, SOL_SOCKET, SO_PASSCRED, &val);
-	soe->has_so_passcred = true;
+	/* Linux 6.16+ refuses these on other than unix and netlink sockets. */
+	ret |= dump_opt_unless_unsupported(sk, SO_PASSCRED, &val, &soe->has_so_passcred);
 	soe->so_passcred = val ? true : false;
 
-	ret |= dump_opt(sk, SOL_SOCKET, SO_PASSSEC, &val);
-	soe->has_so_passsec = true;
+	ret |= dump_opt_unless_unsupported(sk, SO_PASSSEC, &val, &soe->has_so_passsec);
 	soe->so_passsec = val ? true : false;
 
 	ret |= dump_opt(sk, SOL_SOCKET, SO_DONTROUTE, &val);
--- a/criu/cr-dump.c
+++ b/criu/cr-dump.c
@@ -360,6 +360,58 @@
 	return val == RLIM_INFINITY ? -1 : val;
 }
 
+/* One value of /proc/PID/limits: a number or "unlimited". */
+static int parse_proc_limit(const char *s, rlim_t *v)
+{
+	char *end;
+
+	if (!strcmp(s, "unlimited")) {
+		*v = RLIM_INFINITY;
+		return 0;
+	}
+	errno = 0;
+	*v = strtoull(s, &end, 10);
+	return (errno || end == s || *end) ? -1 : 0;
+}
+
+/*
+ * prlimit() on a task of another user needs CAP_SYS_RESOURCE, which some
+ * sandboxes withhold even from root. /proc/PID/limits holds the same
+ * values, one line per resource in resource order after a header, the
+ * name in the first 26 columns.
+ */
+static int dump_task_rlimits_proc(int pid, TaskRlimitsEntry *rls)
+{
+	char path[64], line[256], soft[64], hard[64];
+	int res, ret = -1;
+	FILE *f;
+
+	snprintf(path, sizeof(path), "/proc/%d/limits", pid);
+	f = fopen(path, "r");
+	if (!f) {
+		pr_perror("Can't open %s", path);
+		return -1;
+	}
+	if (!fgets(line, sizeof(line), f))
+		goto out;
+	for (res = 0; res < rls->n_rlimits; res++) {
+		rlim_t cur, max;
+
+		if (!fgets(line, sizeof(line), f) || strlen(line) < 27 ||
+		    sscanf(line + 26, "%63s %63s", soft, hard) != 2 ||
+		    parse_proc_limit(soft, &cur) || parse_proc_limit(hard, &max)) {
+			pr_err("Can't parse line %d of %s\n", res + 2, path);
+			goto out;
+		}
+		rls->rlimits[res]->cur = encode_rlim(cur);
+		rls->rlimits[res]->max = encode_rlim(max);
+	}
+	ret = 0;
+out:
+	fclose(f);
+	return ret;
+}
+
 static int dump_task_rlimits(int pid, TaskRlimitsEntry *rls)
 {
 	int res;
@@ -368,6 +420,8 @@
 		struct rlimit64 lim;
 
 		if (syscall(__NR_prlimit64, pid, res, NULL, &lim)) {
+			if (errno == EPERM)
+				return dump_task_rlimits_proc(pid, rls);
 			pr_perror("Can't get rlimit %d", res);
 			return -1;
 		}
--- a/criu/filesystems.c
+++ b/criu/filesystems.c
@@ -417,7 +417,7 @@
 		userns_pid = root_item->pid->real;
 
 	ret = cr_system_userns(fd, img_raw_fd(img), -1, "tar",
-			       (char *[]){ "tar", "--create", "--gzip", "--no-unquote", "--no-wildcards",
+			       (char *[]){ "tar", "--create", "--no-unquote", "--no-wildcards",
 					   "--one-file-system", "--check-links", "--preserve-permissions", "--sparse",
 					   "--numeric-owner", "--directory", "/proc/self/fd/0", ".", NULL },
 			       0, userns_pid);
@@ -437,6 +437,8 @@
 {
 	int ret;
 	struct cr_img *img;
+	unsigned char magic[2] = { 0, 0 };
+	bool gz;
 
 	img = open_image(CR_FD_TMPFS_DEV, O_RSTR, pm->s_dev);
 	if (empty_image(img)) {
@@ -450,9 +452,13 @@
 		return -1;
 	}
 
+	/* Dumped without --gzip (lockstep): read older, gzipped ones too. */
+	gz = pread(img_raw_fd(img), magic, 2, 0) == 2 && magic[0] == 0x1f && magic[1] == 0x8b;
 	ret = cr_system(img_raw_fd(img), -1, -1, "tar",
-			(char *[]){ "tar", "--extract", "--gzip", "--no-unquote", "--no-wildcards", "--directory",
-				    service_mountpoint(pm), NULL },
+			gz ? (char *[]){ "tar", "--extract", "--gzip", "--no-unquote", "--no-wildcards", "--directory",
+					 service_mountpoint(pm), NULL } :
+			     (char *[]){ "tar", "--extract", "--no-unquote", "--no-wildcards", "--directory",
+					 service_mountpoint(pm), NULL },
 			0);
 	close_image(img);
 
EOF
)

say() { echo "criu.sh: $*"; }
die() {
  echo "criu.sh: ERROR: $*" >&2
  exit 1
}

[[ $(id -u) == 0 ]] || die "must run as root (it installs packages and $DEST)"

# check BINARY: true when `BINARY check` passes. Its output is kept for the
# error message.
CHECK_OUT=""
check() {
  local bin=$1
  [[ -x $bin ]] || return 1
  CHECK_OUT=$("$bin" check 2>&1) && return 0
  return 1
}

# stamp BINARY: what the stamp of a build of ours says about BINARY.
stamp_of() { echo "patch-level=$PATCH_LEVEL sha256=$(sha256sum "$1" | cut -d' ' -f1)"; }

if [[ ${CRIU_FORCE:-} != 1 && -x $DEST && -f $STAMP && $(cat "$STAMP") == $(stamp_of "$DEST") ]]; then
  if check "$DEST"; then
    say "$DEST passes criu check ($("$DEST" --version | head -1), lockstep patch level $PATCH_LEVEL); nothing to do"
    exit 0
  fi
  say "$DEST no longer passes criu check; rebuilding"
fi

mkdir -p "$CACHE"
# One installer at a time (setup may run from several shells).
exec 9>"$CACHE/.lock"
flock 9

start=$(date +%s)

# A binary built by an earlier run: install it again if it still works.
BIN=$CACHE/criu.bin-p$PATCH_LEVEL
if [[ ${CRIU_FORCE:-} != 1 && -x $BIN ]] && check "$BIN"; then
  install -m 0755 "$BIN" "$DEST"
  stamp_of "$DEST" >"$STAMP"
  say "installed the cached build as $DEST ($("$DEST" --version | head -1))"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive

# --- 1. deb-src for the newer suite -------------------------------------
# The machine's own Debian entry gives the mirror URI and the signing key:
# the first deb822 stanza (or one-line entry) that serves the running
# suite's main archive.
. /etc/os-release
CODENAME=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}

find_mirror() {
  local f
  # deb822 files: stanzas separated by blank lines.
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f && $f != "$SRC_LIST" ]] || continue
    awk -v suite="$CODENAME" '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "") {
          split(uris, u, " "); print u[1] "\t" key; found = 1; exit
        }
        types = suites = uris = key = ""
      }
      /^[[:space:]]*#/ { next }
      /^[[:space:]]*$/ { flush(); next }
      tolower($1) == "types:"     { $1 = ""; types = $0 }
      tolower($1) == "suites:"    { $1 = ""; suites = $0 }
      tolower($1) == "uris:"      { $1 = ""; uris = $0; sub(/^ +/, "", uris) }
      tolower($1) == "signed-by:" { $1 = ""; key = $0; sub(/^ +/, "", key) }
      END { if (!found) flush() }
    ' "$f"
  done
  # One-line format: deb [options] URI SUITE COMPONENTS...
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    awk -v suite="$CODENAME" '
      $1 == "deb" {
        key = ""; i = 2
        if ($2 ~ /^\[/) {
          for (; i <= NF; i++) {
            if ($i ~ /signed-by=/) { key = $i; sub(/.*signed-by=/, "", key); sub(/\]$/, "", key) }
            if ($i ~ /\]$/) { i++; break }
          }
        }
        if ($(i + 1) == suite) { print $i "\t" key; exit }
      }' "$f"
  done
}

mirror=$(find_mirror | head -1)
[[ -n $mirror ]] || die "no Debian entry for suite $CODENAME found in /etc/apt/sources.list*; cannot derive a mirror for deb-src $SUITE"
uri=${mirror%%$'\t'*}
key=${mirror#*$'\t'}
# An inline key or none: fall back to the archive keyring.
[[ -n $key && $key != -----* ]] || key=/usr/share/keyrings/debian-archive-keyring.gpg

want="Types: deb-src
URIs: $uri
Suites: $SUITE
Components: main
Signed-By: $key"
if [[ ! -f $SRC_LIST || $(cat "$SRC_LIST") != "# Added by lockstep scripts/criu.sh: source packages only, nothing is installed from here.
$want" ]]; then
  say "adding deb-src $SUITE ($uri) as $SRC_LIST"
  printf '%s\n%s\n' "# Added by lockstep scripts/criu.sh: source packages only, nothing is installed from here." "$want" >"$SRC_LIST"
fi

# --- 2. the build dependencies, from the machine's own suite ------------
missing=()
for p in "${BUILD_DEPS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing build dependencies: ${missing[*]}"
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    die "apt-get install ${missing[*]} failed"
fi

# --- 3. the source -------------------------------------------------------
cd "$CACHE"
orig=$(ls criu_*.orig.tar.* 2>/dev/null | sort -V | tail -1 || true)
if [[ -z $orig ]]; then
  say "updating the package index of the deb-src entry"
  apt-get update -qq -o Dir::Etc::sourcelist="$SRC_LIST" -o Dir::Etc::sourceparts=- \
    -o APT::Get::List-Cleanup=0 || die "apt-get update of $SRC_LIST failed"
  say "downloading the criu source package of $SUITE"
  # The Debian tarball of the revision may be missing on the mirror; the
  # upstream tarball is what we build, so a partial download is fine.
  apt-get source --download-only -qq "criu/$SUITE" >"$CACHE/source.log" 2>&1 ||
    say "apt-get source reported an error (see $CACHE/source.log); continuing if the upstream tarball arrived"
  orig=$(ls criu_*.orig.tar.* 2>/dev/null | sort -V | tail -1 || true)
  [[ -n $orig ]] || die "apt-get source criu/$SUITE brought no criu_*.orig.tar.* (see $CACHE/source.log)"
fi
version=${orig#criu_}
version=${version%.orig.tar.*}
srcdir=$CACHE/criu-$version-p$PATCH_LEVEL
say "criu $version from $orig"

# --- 4. build --------------------------------------------------------------
if [[ ! -x $srcdir/criu/criu ]]; then
  rm -rf "$srcdir" "$CACHE/unpack"
  mkdir -p "$CACHE/unpack"
  tar -xf "$orig" -C "$CACHE/unpack" || die "cannot unpack $orig"
  top=$(ls "$CACHE/unpack")
  [[ $(wc -l <<<"$top") == 1 ]] || die "unexpected layout of $orig"
  mv "$CACHE/unpack/$top" "$srcdir"
  rmdir "$CACHE/unpack"
  say "applying lockstep's patches (level $PATCH_LEVEL)"
  patch -d "$srcdir" -p1 --forward --quiet <<<"$PATCHES" || die "a patch does not apply to criu $version"
  say "building (make criu, 1 to 3 minutes on 2 cores; log: $CACHE/build.log)"
  b0=$(date +%s)
  if ! make -C "$srcdir" -j"$(nproc)" criu >"$CACHE/build.log" 2>&1; then
    tail -30 "$CACHE/build.log" >&2
    die "make criu failed (full log: $CACHE/build.log)"
  fi
  say "built in $(($(date +%s) - b0)) s"
fi
cp "$srcdir/criu/criu" "$BIN.new"
mv "$BIN.new" "$BIN"

# --- 5. install and verify ----------------------------------------------
install -m 0755 "$BIN" "$DEST"
if ! check "$DEST"; then
  echo "$CHECK_OUT" >&2
  die "$DEST was installed but fails 'criu check' (output above)"
fi
stamp_of "$DEST" >"$STAMP"
# Builds of other versions or patch levels are of no further use.
for old in "$CACHE"/criu-*/ "$CACHE"/criu.bin-p*; do
  old=${old%/}
  [[ -e $old && $old != "$srcdir" && $old != "$BIN" ]] && rm -rf "$old"
done
say "installed $DEST ($("$DEST" --version | head -1)): criu check passes; took $(($(date +%s) - start)) s"
