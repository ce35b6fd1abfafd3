// Command pause is the sandbox ("pause") container of the CRI tests: as
// PID 1 of a pod it holds the pod's namespaces, reaps the zombies that
// become its children, and exits on SIGTERM or SIGINT (PID 1 has no
// default signal handlers: a program that never installs any could only
// be killed). The tests build it statically (CGO_ENABLED=0) into an image.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var st syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &st, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
