package main

// The stack ABI's stand-in. Debian's Go (1.19) compiles every Go function to the register ABI
// on amd64, GOEXPERIMENT=noregabi included, so crypto/tls's own Read and Write cannot be had
// with the stack ABI here. stackRead and stackWrite (stackabi_amd64.s) are assembly, which Go
// still calls with the stack ABI (ABI0): the live test hooks them as it would hook (*Conn).Read
// and Write of a Go 1.16 binary, and `gotls stackself` sends all its TLS through them. goRead
// grows its goroutine's stack on the way, so that the stack is copied elsewhere while a hooked
// call is in flight (SP at its RET is not SP at its entry), and counts the times it was.

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"unsafe"
)

func stackRead(c *tls.Conn, b []byte) (int, error)
func stackWrite(c *tls.Conn, b []byte) (int, error)
func stackWriteSplit(c *tls.Conn, b []byte) (int, error)

var stackMoves int64

//go:noinline
func grow(depth int) byte {
	var pad [1024]byte
	pad[depth%1024] = byte(depth)
	if depth == 0 {
		return pad[0]
	}
	return grow(depth-1) + pad[depth%1024]
}

func goRead(c *tls.Conn, b []byte) (int, error) {
	var here int
	before := uintptr(unsafe.Pointer(&here))
	grow(16)
	if uintptr(unsafe.Pointer(&here)) != before {
		atomic.AddInt64(&stackMoves, 1)
	}
	return c.Read(b)
}

func goWrite(c *tls.Conn, b []byte) (int, error) { return c.Write(b) }

// stackConn is a *tls.Conn whose Read and Write go through the stack-ABI functions (Write
// through stackWriteSplit when split is set: the client's).
type stackConn struct {
	*tls.Conn
	split bool
}

func (s stackConn) Read(b []byte) (int, error) { return stackRead(s.Conn, b) }
func (s stackConn) Write(b []byte) (int, error) {
	if s.split {
		return stackWriteSplit(s.Conn, b)
	}
	return stackWrite(s.Conn, b)
}

type stackListener struct {
	net.Listener
	config *tls.Config
}

func (l stackListener) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return stackConn{tls.Server(conn, l.config), false}, nil
}

// stackSelf serves HTTP/1.1 over TLS and calls itself, every TLS read and write of both ends
// through the stack-ABI functions; prints "<server port> <client port> <status>... moves=<n>".
func stackSelf(certFile, keyFile string, ready func()) (string, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return "", err
	}
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	server := &http.Server{Handler: http.HandlerFunc(handler)}
	go server.Serve(stackListener{listener, &tls.Config{Certificates: []tls.Certificate{cert}}})
	port := fmt.Sprint(listener.Addr().(*net.TCPAddr).Port)
	ready()
	local := ""
	transport := &http.Transport{
		DialTLSContext: func(ctx context.Context, network, address string) (net.Conn, error) {
			conn, err := (&net.Dialer{}).DialContext(ctx, network, address)
			if err != nil {
				return nil, err
			}
			local = fmt.Sprint(conn.LocalAddr().(*net.TCPAddr).Port)
			client := tls.Client(conn, &tls.Config{InsecureSkipVerify: true})
			if err := client.HandshakeContext(ctx); err != nil {
				return nil, err
			}
			return stackConn{client, true}, nil
		},
	}
	client := &http.Client{Transport: transport}
	base := "https://127.0.0.1:" + port
	out := []string{}
	requests := []*http.Request{}
	for _, path := range []string{"/orders/1", "/orders/2", "/missing"} {
		request, _ := http.NewRequest("GET", base+path, nil)
		request.Header.Set("Authorization", "Bearer s3cr3t-go-token")
		requests = append(requests, request)
	}
	login, _ := http.NewRequest("POST", base+"/login", strings.NewReader(`{"user": "ann", "password": "hunter2-go"}`))
	login.Header.Set("Content-Type", "application/json")
	for _, request := range append(requests, login) {
		response, err := client.Do(request)
		if err != nil {
			return "", err
		}
		io.ReadAll(response.Body)
		response.Body.Close()
		out = append(out, fmt.Sprintf("%s:%d", response.Proto, response.StatusCode))
	}
	transport.CloseIdleConnections()
	return fmt.Sprintf("%s %s %s moves=%d", port, local, strings.Join(out, " "), atomic.LoadInt64(&stackMoves)), nil
}
