// Command cleanwall-demo is the demo's helper: `serve` plays the remote
// side (HTTP on :8080 and :8081, UDP echo on :9999, on every address of its
// namespace), `udp ADDR` sends a datagram and waits for the echo.
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: cleanwall-demo serve | udp HOST:PORT")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		serve()
	case "udp":
		if len(os.Args) != 3 {
			os.Exit(2)
		}
		os.Exit(udpProbe(os.Args[2]))
	default:
		os.Exit(2)
	}
}

func serve() {
	for _, port := range []string{"8080", "8081"} {
		mux := http.NewServeMux()
		p := port
		mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "results API on port %s: hello %s\n", p, r.RemoteAddr)
		})
		srv := &http.Server{Addr: ":" + port, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := srv.ListenAndServe(); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
		}()
	}
	pc, err := net.ListenPacket("udp", ":9999")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	buf := make([]byte, 2048)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		_, _ = pc.WriteTo(buf[:n], from)
	}
}

func udpProbe(addr string) int {
	c, err := net.Dial("udp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if err != nil {
		fmt.Fprintln(os.Stderr, "no answer:", err)
		return 1
	}
	fmt.Printf("echo: %s\n", buf[:n])
	return 0
}
