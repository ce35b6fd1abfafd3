package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"syscall"

	"github.com/cleanwall/cleanwall/internal/netns"
)

// The command of `cleanwall run` must not outlive it: it is untrusted, and
// once the run is gone nobody tears its sandbox down. So it runs under an
// init of our own (this binary, sandboxInitCmd) that is PID 1 of a new PID
// namespace and gets SIGKILL when `cleanwall run` dies (Pdeathsig). When
// an init dies the kernel kills everything else in its namespace: the
// command and whatever it forked, daemonized or not. The init forwards the
// signals `cleanwall run` passes on, reaps orphans, and exits with the
// command's status; when the command ends the sandbox ends, and so does
// anything the command left running in the background.
//
// Why not a cgroup: cgroup.kill needs someone alive to write it, and a
// SIGKILLed `cleanwall run` is not; PR_SET_PDEATHSIG on the command alone
// does not reach a grandchild. /proc is left as it was (the host's). When
// the policy has volumes the init gets a mount namespace too, and mounts
// them there before the command starts (runvolumes.go).
const sandboxInitCmd = "__sandbox-init"

// forwardedSignals are passed on to the command (through the init).
var forwardedSignals = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2}

// runCommand runs the command inside the sandbox namespace, under the
// sandbox init, with the terminal's stdio; it forwards signals and returns
// the command's exit status (128+n for a signal, as shells do).
func runCommand(nsPath string, argv []string, sigs <-chan os.Signal, vols *volumePlan) int {
	path, err := exec.LookPath(argv[0])
	if err != nil {
		fmt.Fprintf(os.Stderr, "cleanwall: %v\n", err)
		return 127
	}
	// Signals go to the init over a pipe, not as signals: the init then
	// tells what `cleanwall run` forwards from what the terminal sends
	// the whole foreground group (the command already has those). Its
	// end of file also tells the init that `cleanwall run` is gone.
	ctlR, ctlW, err := os.Pipe()
	if err != nil {
		fmt.Fprintf(os.Stderr, "cleanwall: starting %s: %v\n", argv[0], err)
		return 126
	}
	defer ctlW.Close()
	volArgs, err := vols.initArgs()
	if err != nil {
		fmt.Fprintf(os.Stderr, "cleanwall: starting %s: %v\n", argv[0], err)
		return 126
	}
	initArgs := append(append([]string{sandboxInitCmd}, volArgs...), "--", path)
	sbInit := exec.Command("/proc/self/exe", append(initArgs, argv[1:]...)...)
	sbInit.Args[0] = "cleanwall"
	sbInit.Stdin, sbInit.Stdout, sbInit.Stderr = os.Stdin, os.Stdout, os.Stderr
	sbInit.Env = append(os.Environ(), "CLEANWALL_SANDBOX=1")
	sbInit.ExtraFiles = []*os.File{ctlR} // fd 3
	sbInit.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID, Pdeathsig: syscall.SIGKILL}
	if vols != nil {
		// The volumes are mounted in a mount namespace of the command's own.
		sbInit.SysProcAttr.Cloneflags |= syscall.CLONE_NEWNS
	}

	interactive := isTerminal(os.Stdin)
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			select {
			case s := <-sigs:
				// A terminal delivers Ctrl-C to the whole foreground group,
				// the command included: forwarding it would double it.
				if s == syscall.SIGINT && interactive {
					continue
				}
				_, _ = ctlW.Write([]byte{byte(s.(syscall.Signal))})
			case <-done:
				return
			}
		}
	}()

	// Pdeathsig fires when the *thread* that forked the init exits, and
	// the child forks from a thread inside the sandbox namespace. Do runs
	// its function on a goroutine locked to its own thread: it stays there,
	// blocked in Wait, for the command's whole life.
	var waitErr error
	startErr := netns.Do(nsPath, func() error {
		if err := sbInit.Start(); err != nil {
			return err
		}
		ctlR.Close()
		waitErr = sbInit.Wait()
		return nil
	})
	if startErr != nil {
		ctlR.Close()
		fmt.Fprintf(os.Stderr, "cleanwall: starting %s: %v\n", argv[0], startErr)
		return 126
	}
	var ee *exec.ExitError
	if errors.As(waitErr, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return ee.ExitCode()
	}
	if waitErr != nil {
		return 1
	}
	return 0
}

// sandboxInit is PID 1 of a sandbox's PID namespace (args: -- PATH ARGV...,
// the control pipe on fd 3). It starts the command, forwards the signals
// read from the pipe, reaps every process reparented to it, and returns
// the command's status; its exit ends everything left in the namespace.
func sandboxInit(args []string) int {
	vols, args, err := parseVolumesArg(args)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cleanwall: sandbox init: %v\n", err)
		return 126
	}
	if len(args) < 2 || args[0] != "--" || os.Getpid() != 1 {
		fmt.Fprintf(os.Stderr, "cleanwall: %s is cleanwall run's own, not a command\n", sandboxInitCmd)
		return 2
	}
	argv := args[1:]
	if vols != nil {
		if err := vols.mount(); err != nil {
			fmt.Fprintf(os.Stderr, "cleanwall: %v: %s not started\n", err, argv[0])
			return 126
		}
	}
	ctl := os.NewFile(3, "cleanwall-run-control")
	syscall.CloseOnExec(3)
	// Signals sent to the init itself are not for the command: the terminal
	// reaches the command directly (same process group) and `cleanwall run`
	// forwards through the pipe. Catching them keeps the Go runtime from
	// exiting on them; the command starts with default handlers (exec
	// resets caught signals, unlike ignored ones).
	direct := make(chan os.Signal, 16)
	signal.Notify(direct, forwardedSignals...)
	go func() {
		for range direct {
		}
	}()
	pid, err := syscall.ForkExec(argv[0], argv, &syscall.ProcAttr{Env: os.Environ(), Files: []uintptr{0, 1, 2}})
	if err != nil {
		fmt.Fprintf(os.Stderr, "cleanwall: starting %s: %v\n", argv[0], err)
		return 126
	}
	go func() {
		buf := make([]byte, 64)
		for {
			n, err := ctl.Read(buf)
			for _, s := range buf[:n] {
				_ = syscall.Kill(pid, syscall.Signal(s))
			}
			if err != nil {
				if err != io.EOF {
					fmt.Fprintf(os.Stderr, "cleanwall: sandbox init: %v\n", err)
				}
				// `cleanwall run` is gone (its death signal normally got
				// here first): the sandbox goes with it.
				os.Exit(128 + int(syscall.SIGKILL))
			}
		}
	}()
	for {
		var ws syscall.WaitStatus
		wpid, err := syscall.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "cleanwall: sandbox init: waiting for %s: %v\n", argv[0], err)
			return 1
		}
		if wpid != pid {
			continue // an orphan reparented to us, now reaped
		}
		if ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return ws.ExitStatus()
	}
}
