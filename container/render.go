package container

import (
	"bytes"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"text/template"
	"unicode/utf8"
)

// TemplateData is what the files of an app folder and the start command
// line see when rendered.
type TemplateData struct {
	Dir  string // this copy's directory (absolute)
	Host string // address the server binds to; "" means all
	Port int
	Name string // this copy's name (e.g. the replica's host name)
	// Listen is Host:Port, or just Port when Host is empty (the syntax of
	// Apache's Listen; IPv6 hosts come bracketed).
	Listen string
	// Addr is where to reach the server: Listen with a wildcard host
	// replaced by the loopback address.
	Addr string
}

func newTemplateData(dir, name, host string, port int) TemplateData {
	d := TemplateData{Dir: dir, Host: host, Port: port, Name: name}
	d.Listen = strconv.Itoa(port)
	if host != "" {
		d.Listen = joinHostPort(host, port)
	}
	switch host {
	case "", "0.0.0.0", "*":
		d.Addr = joinHostPort("127.0.0.1", port)
	case "::":
		d.Addr = joinHostPort("::1", port)
	default:
		d.Addr = joinHostPort(host, port)
	}
	return d
}

func joinHostPort(host string, port int) string {
	return net.JoinHostPort(host, strconv.Itoa(port))
}

// templateFuncs: env looks a variable up in the server's environment
// (ServerOptions.Env, then Config.Env, then this process's), with a
// default: {{env "APACHE_MPM" "worker"}}.
func templateFuncs(lookup func(string) (string, bool)) template.FuncMap {
	return template.FuncMap{
		"env": func(key, def string) string {
			if v, ok := lookup(key); ok && v != "" {
				return v
			}
			return def
		},
	}
}

// renderString expands one string (a start argument).
func renderString(name, text string, data TemplateData, funcs template.FuncMap) (string, error) {
	t, err := template.New(name).Funcs(funcs).Option("missingkey=error").Parse(text)
	if err != nil {
		return "", err
	}
	var b bytes.Buffer
	if err := t.Execute(&b, data); err != nil {
		return "", err
	}
	return b.String(), nil
}

// renderDir renders every file below src into dst, keeping relative paths,
// permissions and modification times (so that Last-Modified and ETag are
// the same on every replica rendered from the same checkout). Files that
// are not UTF-8 text are copied as they are.
func renderDir(src, dst string, data TemplateData, funcs template.FuncMap) error {
	info, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("app folder: %w", err)
	}
	if !info.IsDir() {
		return fmt.Errorf("app folder %s is not a directory", src)
	}
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		out := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(out, 0o755)
		}
		fi, err := os.Stat(path) // follows symlinks to files
		if err != nil {
			return err
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("%s: not a regular file", path)
		}
		raw, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if utf8.Valid(raw) && bytes.IndexByte(raw, 0) < 0 {
			s, err := renderString(rel, string(raw), data, funcs)
			if err != nil {
				return fmt.Errorf("rendering %s: %w", path, err)
			}
			raw = []byte(s)
		}
		if err := writeWithMode(out, raw, fi.Mode().Perm()); err != nil {
			return err
		}
		return os.Chtimes(out, fi.ModTime(), fi.ModTime())
	})
}

func writeWithMode(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode) // an existing file keeps its old mode otherwise
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
