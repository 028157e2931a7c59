// A Go TLS server and client on the standard library alone (crypto/tls, net/http), for the
// live tests of the collector's Go uprobes (tests/live/test_tls_go_live.py).
//
//	gotls serve CERT KEY     serve HTTPS (HTTP/1.1 and HTTP/2) on 127.0.0.1, print the port,
//	                         stop when stdin closes
//	gotls get PORT h1|h2     wait for a line on stdin, then make the calls below to PORT over
//	                         one connection, and print "<local port> <status>..."
//	gotls self CERT KEY      both, in one process: the h1 then the h2 calls
//	gotls loop PORT N        wait for a line on stdin, then N GETs over one HTTP/1.1 connection
//	                         (for measuring the uprobes' cost)
//	gotls stackself CERT KEY serve and call itself over HTTP/1.1 (after a line on stdin), every
//	                         TLS read and write through stack-ABI functions (stackabi_amd64.go)
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
)

func handler(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.Method == "POST" && r.URL.Path == "/login":
		body, _ := io.ReadAll(r.Body)
		if strings.Contains(string(body), `"password": "right"`) {
			w.WriteHeader(200)
		} else {
			w.WriteHeader(401)
		}
		w.Write([]byte("{}"))
	case strings.HasPrefix(r.URL.Path, "/orders/"):
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"order": %q, "proto": %q}`, strings.TrimPrefix(r.URL.Path, "/orders/"), r.Proto)
	default:
		http.NotFound(w, r)
	}
}

func serve(cert, key string) (net.Listener, error) {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	server := &http.Server{Handler: http.HandlerFunc(handler)}
	go server.ServeTLS(listener, cert, key)
	return listener, nil
}

func get(port string, version string) (string, error) {
	local := ""
	dial := func(ctx context.Context, network, address string) (net.Conn, error) {
		conn, err := (&net.Dialer{}).DialContext(ctx, network, address)
		if err == nil {
			local = fmt.Sprint(conn.LocalAddr().(*net.TCPAddr).Port)
		}
		return conn, err
	}
	transport := &http.Transport{
		DialContext:     dial,
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
	}
	if version == "h2" {
		transport.ForceAttemptHTTP2 = true
	} else {
		transport.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	client := &http.Client{Transport: transport}
	base := "https://127.0.0.1:" + port
	out := []string{}
	do := func(request *http.Request) error {
		response, err := client.Do(request)
		if err != nil {
			return err
		}
		io.ReadAll(response.Body)
		response.Body.Close()
		out = append(out, fmt.Sprintf("%s:%d", response.Proto, response.StatusCode))
		return nil
	}
	for _, path := range []string{"/orders/1", "/orders/2", "/missing"} {
		request, _ := http.NewRequest("GET", base+path, nil)
		request.Header.Set("Authorization", "Bearer s3cr3t-go-token")
		if err := do(request); err != nil {
			return "", err
		}
	}
	request, _ := http.NewRequest("POST", base+"/login", strings.NewReader(`{"user": "ann", "password": "hunter2-go"}`))
	request.Header.Set("Content-Type", "application/json")
	if err := do(request); err != nil {
		return "", err
	}
	transport.CloseIdleConnections()
	return local + " " + strings.Join(out, " "), nil
}

func main() {
	var err error
	switch os.Args[1] {
	case "serve":
		var listener net.Listener
		if listener, err = serve(os.Args[2], os.Args[3]); err == nil {
			fmt.Println(listener.Addr().(*net.TCPAddr).Port)
			io.ReadAll(os.Stdin)
		}
	case "get":
		bufio.NewReader(os.Stdin).ReadString('\n')
		var line string
		if line, err = get(os.Args[2], os.Args[3]); err == nil {
			fmt.Println(line)
		}
	case "loop":
		bufio.NewReader(os.Stdin).ReadString('\n')
		transport := &http.Transport{
			TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
			TLSNextProto:    map[string]func(string, *tls.Conn) http.RoundTripper{},
		}
		client := &http.Client{Transport: transport}
		count := 0
		fmt.Sscan(os.Args[3], &count)
		for i := 0; i < count && err == nil; i++ {
			var response *http.Response
			if response, err = client.Get("https://127.0.0.1:" + os.Args[2] + "/orders/1"); err == nil {
				io.ReadAll(response.Body)
				response.Body.Close()
			}
		}
	case "stackself":
		var line string
		line, err = stackSelf(os.Args[2], os.Args[3], func() { bufio.NewReader(os.Stdin).ReadString('\n') })
		if err == nil {
			fmt.Println(line)
		}
	case "self":
		var listener net.Listener
		if listener, err = serve(os.Args[2], os.Args[3]); err == nil {
			port := fmt.Sprint(listener.Addr().(*net.TCPAddr).Port)
			bufio.NewReader(os.Stdin).ReadString('\n')
			for _, version := range []string{"h1", "h2"} {
				var line string
				if line, err = get(port, version); err != nil {
					break
				}
				fmt.Println(port, line)
			}
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
