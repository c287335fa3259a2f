# lockstep: the two commands of the README are `make demo` and `make test`.
# Each first runs scripts/setup.sh, which installs what is missing.

GO      ?= go
BIN     := bin/lockstep
export PATH := /usr/local/go/bin:$(PATH)

.PHONY: all setup build demo test fuzz soak recover-large bench-log vet clean

all: build

setup:
	@bash scripts/setup.sh

build:
	$(GO) build -o $(BIN) ./cmd/lockstep

vet:
	gofmt -l $$(git ls-files '*.go') | (! grep .) || (echo "gofmt needed" && false)
	$(GO) vet ./...

# The main job: a replicated demo with its numbers. Apache alone against
# Apache behind three replicas (each in its own network namespace, half a
# core each), ab -c 8 from a client namespace; then the replicated log
# against etcd.
demo: setup build
	$(BIN) eval --config configs/apache.toml --modes orig,proxy_only --rounds 3
	$(BIN) bench log --replicas 3 --clients 1,64 --duration 10s

# Every test, including a short end-to-end run of every capability and a
# brief run of each fuzz target.
test: setup vet
	$(GO) test -count=1 -timeout 25m ./...
	$(MAKE) fuzz

# An execution count, not a duration: Go 1.26's fuzz coordinator can fail a
# duration-bounded run with a spurious "context deadline exceeded" at the
# deadline (go.dev/issue/75804, fixed in Go 1.27). `make fuzz FUZZTIME=5m`
# fuzzes longer.
FUZZTIME ?= 50000x
fuzz:
	$(GO) test ./paxos/wal -run='^$$' -fuzz=FuzzDecodeRecord -fuzztime=$(FUZZTIME)
	$(GO) test ./paxos/transport -run='^$$' -fuzz=FuzzReadFrame -fuzztime=$(FUZZTIME)
	$(GO) test ./proxy -run='^$$' -fuzz=FuzzDecodeEvent -fuzztime=$(FUZZTIME)

# Longer soaks, not part of `make test`.
soak: setup
	LOCKSTEP_SOAK=1 $(GO) test -count=1 -timeout 60m ./...

# MariaDB recovery with about 1 GiB of tables (4 x 1M rows): the prepare
# alone takes minutes; prints pause, image, restore and catch-up.
recover-large: setup
	LOCKSTEP_MARIADB_ROWS=1000000 $(GO) test -count=1 -timeout 50m -run TestRecoverMariaDBLarge -v ./cmd/lockstep

bench-log: setup build
	$(BIN) bench log --replicas 3 --clients 1,64 --duration 20s

clean:
	rm -rf bin
