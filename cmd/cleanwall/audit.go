package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/cleanwall/cleanwall/governance/audit"
)

// cmdAudit verifies a hash-chained audit log: exit 0 when every record
// chains to the one before, 1 naming the first broken record otherwise.
func cmdAudit(args []string) error {
	if len(args) != 2 || args[0] != "verify" {
		return fail("usage: cleanwall audit verify FILE")
	}
	f, err := os.Open(args[1])
	if err != nil {
		return fail("%v", err)
	}
	defer f.Close()
	r := audit.NewReader(f)
	kinds := map[string]int{}
	n := 0
	for {
		rec, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", args[1], err)
			return &exitError{1}
		}
		n++
		kinds[rec.Kind]++
	}
	fmt.Printf("%s: %d records, chain intact\n", args[1], n)
	for k, c := range kinds {
		fmt.Printf("  %-22s %d\n", k, c)
	}
	return nil
}
