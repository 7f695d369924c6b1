// Command mmiobroker-bench is mmiobroker's cross-process load generator: "run" starts a
// daemon process on fake devices and client processes against it, and writes the results
// table (make bench writes docs/benchmarks.md); "daemon" and "client" are the processes it
// starts. Package test/bench describes what it measures.
package main

import (
	"os"

	"github.com/mmiobroker/mmiobroker/test/bench"
)

func main() {
	os.Exit(bench.Main(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}
