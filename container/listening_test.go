package container

import (
	"net"
	"testing"
)

func TestParseProcAddr(t *testing.T) {
	for _, c := range []struct {
		in   string
		ip   string
		port uint16
	}{
		{"0100007F:1F90", "127.0.0.1", 8080},
		{"00000000:0CEA", "0.0.0.0", 3306},
		{"00000000000000000000000001000000:1F90", "::1", 8080},
	} {
		ip, port, err := parseProcAddr(c.in)
		if err != nil || !ip.Equal(net.ParseIP(c.ip)) || port != c.port {
			t.Errorf("%s: %v %d %v, want %s %d", c.in, ip, port, err, c.ip, c.port)
		}
	}
	for _, bad := range []string{"", "0100007F", "01007F:1F90", "zz00007F:1F90", "0100007F:xyz"} {
		if _, _, err := parseProcAddr(bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

func TestListening(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	if ok, err := Listening(addr); !ok || err != nil {
		t.Fatalf("Listening(%s) = %v, %v while it listens", addr, ok, err)
	}
	ln.Close()
	if ok, err := Listening(addr); ok || err != nil {
		t.Fatalf("Listening(%s) = %v, %v after it closed", addr, ok, err)
	}
	if _, err := Listening("nonsense"); err == nil {
		t.Fatal("no error for a bad address")
	}
}

func TestAcceptQueue(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().String()
	if n, err := AcceptQueue(addr); n != 0 || err != nil {
		t.Fatalf("AcceptQueue = %d, %v with nothing connected", n, err)
	}
	for range 2 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	if n, err := AcceptQueue(addr); n != 2 || err != nil {
		t.Fatalf("AcceptQueue = %d, %v with two connections not accepted", n, err)
	}
	c, _ := ln.Accept()
	c.Close()
	if n, _ := AcceptQueue(addr); n != 1 {
		t.Fatalf("AcceptQueue = %d after one accept", n)
	}
}
