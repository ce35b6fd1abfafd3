package audit

import (
	"bufio"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestCrashWriter is the child of TestSIGKILLNeverLosesAcknowledged: four
// goroutines append records and acknowledge each on stdout once Append
// returned, until the parent kills the process.
func TestCrashWriter(t *testing.T) {
	path := os.Getenv("AUDIT_CRASH_LOG")
	if path == "" {
		t.Skip("the child of TestSIGKILLNeverLosesAcknowledged")
	}
	key, err := ReadNodeKey(os.Getenv("AUDIT_CRASH_KEY"))
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	l, err := Open(path, Options{Signer: key, MaxSize: 4 << 10, CheckpointInterval: time.Millisecond})
	if err != nil {
		fmt.Println("error", err)
		os.Exit(2)
	}
	round := os.Getenv("AUDIT_CRASH_ROUND")
	var mu sync.Mutex
	out := bufio.NewWriter(os.Stdout)
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				id := fmt.Sprintf("%s-%d-%d", round, g, i)
				if _, err := l.Append("op", map[string]any{"id": id}); err != nil {
					mu.Lock()
					fmt.Fprintln(out, "error", err)
					out.Flush()
					mu.Unlock()
					os.Exit(2)
				}
				// The acknowledgement: only after Append returned.
				mu.Lock()
				fmt.Fprintln(out, "ack", id)
				out.Flush()
				mu.Unlock()
			}
		})
	}
	wg.Wait()
}

// A process killed with SIGKILL at random points (mid-append, mid-rotation,
// mid-checkpoint, between an append and its acknowledgement) never leaves an
// acknowledged record out of the log, and the log it leaves opens, continues
// and verifies. (SIGKILL keeps the page cache: this tests the order of
// write, rotation and acknowledgement; the fsync before Append returns is
// what extends it to a power loss.)
func TestSIGKILLNeverLosesAcknowledged(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.jsonl")
	keyPath := filepath.Join(dir, "node.key")
	if _, _, err := LoadOrCreateNodeKey(keyPath); err != nil {
		t.Fatal(err)
	}
	acked := map[string]bool{}
	rounds := 20
	for round := range rounds {
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrashWriter$", "-test.count=1")
		cmd.Env = append(os.Environ(), "AUDIT_CRASH_LOG="+path, "AUDIT_CRASH_KEY="+keyPath, "AUDIT_CRASH_ROUND="+strconv.Itoa(round))
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(stdout)
		// Wait for the first acknowledgement (the child is writing), then
		// kill it after a random delay.
		if !sc.Scan() {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("round %d: the child acknowledged nothing", round)
		}
		first := sc.Text()
		if round == 0 {
			// Another process cannot write the log meanwhile.
			if _, err := Open(path, Options{}); !errors.Is(err, ErrLocked) {
				t.Fatalf("Open while another process writes = %v, want ErrLocked", err)
			}
		}
		time.Sleep(time.Duration(rand.IntN(30000)) * time.Microsecond)
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		n := 0
		for line := first; ; line = sc.Text() {
			id, ok := strings.CutPrefix(line, "ack ")
			if !ok {
				t.Fatalf("round %d: child said %q", round, line)
			}
			acked[id] = true
			n++
			if !sc.Scan() {
				break
			}
		}
		cmd.Wait()
		t.Logf("round %d: %d acknowledged before SIGKILL", round, n)
	}
	// The log opens (cutting a torn tail if any), and holds every
	// acknowledged record in a chain that verifies.
	l, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	found := map[string]bool{}
	sum, err := VerifyFiles(mustFiles(t, path), VerifyOptions{Visit: func(_ string, _ int, r Record) {
		if r.Kind == "op" {
			found[r.Fields["id"].(string)] = true
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	missing := 0
	for id := range acked {
		if !found[id] {
			missing++
			t.Errorf("acknowledged %s is not in the log", id)
		}
	}
	t.Logf("%d acknowledged, %d in the log (%d records, %d files, %d checkpoints, %d recoveries)",
		len(acked), len(found), sum.Records, len(sum.Files), sum.Checkpoints, sum.Kinds[KindRecovered])
	if len(acked) < rounds || missing > 0 || len(sum.Files) < 2 {
		t.Fatalf("%d acknowledged, %d missing, %d files", len(acked), missing, len(sum.Files))
	}
}
