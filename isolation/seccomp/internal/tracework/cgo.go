//go:build tracecgo

package main

// Built with -tags tracecgo the program links the C runtime the way a
// kvmkit binary does whenever cgo is enabled (through package net), so
// that threads are created by glibc's pthread_create.
import _ "runtime/cgo"
