# mmiobroker — build, test, generate, lint, and the real-kernel VM rig.
#
#   make demo             the real-kernel VM demo (sets the rig up on first use)
#   make test             everything CI runs: lint, generated-code check, unit tests with -race
#                         (fuzz seeds included), and the VM suites on both guest kernels
#   make test-unit        unit tests only (no VM)
#   make test-vm          the VM suites only
#   make soak             1000 kill -9 restarts of mmiobrokerd under load in the systemd-mode VM
#                         (iommufd kernel; not in CI; SOAK=N for another count)
#   make vm-shell         boot the rig VM with a shell
#   make bench            the cross-process generator (docs/benchmarks.md, the results table), then
#                         the in-process and VM benchmarks (bench/results.txt)
#   make generate         regenerate protobuf code (protoc + pinned plugins)

SHELL     := /bin/bash
GO        ?= go
KERNEL    ?= stock
BIN       := bin
PLUGINS   := $(CURDIR)/.bin
STATICCHECK_VERSION := v0.8.2
GRPCURL_VERSION     := v1.9.4
export GOFLAGS ?=

.PHONY: all build test test-unit test-vm lint vet staticcheck generate check-generate \
        setup demo vm-shell bench bench-smoke fuzz clean soak

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/ ./cmd/...

setup:
	test/vm/setup.sh

test: setup lint check-generate test-unit test-vm

test-unit: $(PLUGINS)/grpcurl
	PATH=$(PLUGINS):$$PATH $(GO) test -race -count=1 ./...
	$(MAKE) bench-smoke

# Every in-process benchmark, 100 iterations each, and the cross-process load generator
# (test/bench) with a few hundred operations and 4 client processes: a benchmark or a
# generator run that breaks fails make test, never its speed (the figures come from make
# bench). The generator's table goes to bin/bench-smoke.md.
bench-smoke:
	@out=$$($(GO) test -count=1 -run '^$$' -bench . -benchtime 100x ./internal/... 2>&1) || { echo "$$out" | grep -v '^ok\|no test files\|^PASS$$' | tail -80; exit 1; }; echo "bench smoke: every benchmark ran 100 times"
	@mkdir -p $(BIN)
	@out=$$($(GO) run ./test/bench/cmd/mmiobroker-bench run -ops 300 -clients 4 -revokes 100 -alloc-ops 100 -warmup 5 -scale-leases 2000 -scale-probes 20 -scale-watchers 20 -scale-stream 1s -out $(BIN)/bench-smoke.md 2>&1) || { echo "$$out" | tail -40; exit 1; }; echo "bench smoke: mmiobroker-bench ran every scenario ($(BIN)/bench-smoke.md)"

# grpcurl drives the API in internal/server's TestGrpcurl, as a client written from the docs.
$(PLUGINS)/grpcurl:
	GOBIN=$(PLUGINS) $(GO) install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

test-vm: setup
	MMIOBROKER_VM=1 $(GO) test -count=1 ./test/uapi/
	mkdir -p $(BIN)
	MMIOBROKER_VM=1 $(GO) test -count=1 -timeout 30m -v ./test/vm/ 2>&1 | tee $(BIN)/vm-test.log | grep -E '^(=== RUN|\s*--- (PASS|FAIL|SKIP)|PASS|FAIL|ok|vm:)' ; test $${PIPESTATUS[0]} -eq 0

# The soak (not in CI; CI runs TestSoakShort, 50 restarts, inside test-vm): SOAK kill -9
# restarts of mmiobrokerd under allocation load in the systemd-mode VM on the iommufd
# kernel (test/vm/systemd TestSoak; MMIOBROKER_VM_SOAK reaches the guest as mmb.soak=N).
# Prints the SOAK RESULT line (restarts, leases granted, lost, leaked dma-bufs, unexpected
# revocations, restart-to-READY p50/p99) and fails if lost, leaked or unexpected is not 0.
SOAK ?= 1000
soak: setup
	mkdir -p $(BIN)
	MMIOBROKER_VM=1 MMIOBROKER_VM_MODES=systemd MMIOBROKER_VM_KERNELS=iommufd MMIOBROKER_VM_SOAK=$(SOAK) \
	MMIOBROKER_VM_RUN='^(TestSocketActivation|TestSoak)$$' \
	$(GO) test -count=1 -timeout $$(( $(SOAK) * 10 + 1800 ))s -v -run TestVM ./test/vm/ 2>&1 | tee $(BIN)/soak.log | \
	grep -E '^(\s*--- (PASS|FAIL|SKIP)|PASS|FAIL|ok|vm:)|SOAK RESULT|restart [0-9]+/' ; test $${PIPESTATUS[0]} -eq 0

vet:
	$(GO) vet ./...
	$(GO) vet -tags vmtest ./...
	$(GO) vet -tags vmsystemd ./...

staticcheck:
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) -tags vmtest ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) -tags vmsystemd ./...

lint: vet staticcheck
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

$(PLUGINS)/protoc-gen-go $(PLUGINS)/protoc-gen-go-grpc: go.mod
	GOBIN=$(PLUGINS) $(GO) install tool

generate: $(PLUGINS)/protoc-gen-go $(PLUGINS)/protoc-gen-go-grpc
	@test -f /usr/include/google/protobuf/timestamp.proto || { echo "make generate: protoc lacks the well-known types (google/protobuf/timestamp.proto): apt-get install libprotobuf-dev"; exit 1; }
	PATH=$(PLUGINS):$$PATH protoc -I api/proto \
		--go_out=. --go_opt=module=github.com/mmiobroker/mmiobroker \
		--go-grpc_out=. --go-grpc_opt=module=github.com/mmiobroker/mmiobroker \
		$$(find api/proto -name '*.proto')
	PATH=$(PLUGINS):$$PATH protoc -I internal/journal/recordpb \
		--go_out=. --go_opt=module=github.com/mmiobroker/mmiobroker internal/journal/recordpb/record.proto

check-generate: generate
	@git diff --exit-code -- api/gen internal/journal/recordpb || { echo "generated code is stale: run make generate and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- api/gen internal/journal/recordpb)" || { echo "untracked generated files: run make generate and commit"; git status --porcelain -- api/gen internal/journal/recordpb; exit 1; }

demo: setup
	$(GO) run ./test/vm/cmd/rig demo -kernel $(KERNEL)

vm-shell: setup
	$(GO) run ./test/vm/cmd/rig shell -kernel $(KERNEL)

# The cross-process load generator first (docs/benchmarks.md, the results table; daemon CPU
# profiles in bench/profiles), then the in-process benchmarks and the VM's (bench/results.txt;
# the VM's also as docs/benchmarks-vm.md, their table next to the bare ioctl and a VMM that
# exports itself, written by test/vm/cmd/rig bench). Any failure fails make bench, after the
# steps before it wrote their results.
bench: setup
	mkdir -p bench
	$(GO) run ./test/bench/cmd/mmiobroker-bench run -out docs/benchmarks.md -cpuprofile bench/profiles
	set -o pipefail; $(GO) test -run '^$$' -bench . -benchmem -count 5 ./internal/... | tee bench/results.txt
	$(GO) run ./test/vm/cmd/rig bench -kernel all -out docs/benchmarks-vm.md | tee -a bench/results.txt; test $${PIPESTATUS[0]} -eq 0

fuzz:
	@for p in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list 'Fuzz.*' $$p | grep ^Fuzz); do \
	    echo "== $$p $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $${FUZZTIME:-20s} $$p || exit 1; \
	  done; done

clean:
	rm -rf $(BIN) $(PLUGINS)
