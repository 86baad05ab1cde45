// Package integration holds end-to-end tests of the elasticserve binary: each
// test starts the real server on a loopback port with the tiny generated model
// (internal/testmodel) and talks to it over HTTP, mostly through the official
// OpenAI Go SDK. The package has no non-test code besides this comment.
//
// Run it like any other package (the cgo flags come from the Makefile):
//
//	eval "$(make -s env)"
//	go test ./integration/
//	go test -run '^$' -bench . -benchtime 1x ./integration/
package integration
