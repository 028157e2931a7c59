//go:build !amd64

package main

import "errors"

func stackSelf(certFile, keyFile string, ready func()) (string, error) {
	return "", errors.New("stackself: amd64 only")
}
