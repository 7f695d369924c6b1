package dra

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/dynamic-resource-allocation/cel"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
)

const manifestDir = "../../deploy/kubernetes"

// decodeManifests decodes every YAML document under deploy/kubernetes strictly into its
// k8s.io/api type: an unknown or duplicate field, an unknown kind or a document that is
// not an object fails.
func decodeManifests(t *testing.T) map[string][]runtime.Object {
	t.Helper()
	dec := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()
	out := map[string][]runtime.Object{}
	err := filepath.WalkDir(manifestDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".yaml") {
			return err
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		r := utilyaml.NewYAMLReader(bufio.NewReader(f))
		for i := 0; ; i++ {
			doc, err := r.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return err
			}
			if onlyComments(doc) {
				continue
			}
			obj, _, err := dec.Decode(doc, nil, nil)
			if err != nil {
				t.Errorf("%s, document %d: %v", path, i, err)
				continue
			}
			out[path] = append(out[path], obj)
		}
		if len(out[path]) == 0 {
			t.Errorf("%s: no object", path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func onlyComments(doc []byte) bool {
	for _, l := range bytes.Split(doc, []byte("\n")) {
		l = bytes.TrimSpace(l)
		if len(l) > 0 && l[0] != '#' && string(l) != "---" {
			return false
		}
	}
	return true
}

// TestManifests: deploy/kubernetes decodes strictly, its parts fit together (the
// DaemonSet's paths, service account, RBAC and admission policy name the same things),
// and the CEL selectors of its DeviceClasses and examples compile and select the devices
// they say they select, as the plugin publishes them.
func TestManifests(t *testing.T) {
	var (
		ds        *appsv1.DaemonSet
		sa        *corev1.ServiceAccount
		binding   *rbacv1.ClusterRoleBinding
		role      *rbacv1.ClusterRole
		vap       *admissionv1.ValidatingAdmissionPolicy
		classes   = map[string]*resourceapi.DeviceClass{}
		templates = map[string]*resourceapi.ResourceClaimTemplate{}
		pods      []*corev1.Pod
	)
	for _, objs := range decodeManifests(t) {
		for _, o := range objs {
			switch o := o.(type) {
			case *appsv1.DaemonSet:
				ds = o
			case *corev1.ServiceAccount:
				sa = o
			case *rbacv1.ClusterRoleBinding:
				binding = o
			case *rbacv1.ClusterRole:
				role = o
			case *admissionv1.ValidatingAdmissionPolicy:
				vap = o
			case *resourceapi.DeviceClass:
				classes[o.Name] = o
			case *resourceapi.ResourceClaimTemplate:
				templates[o.Name] = o
			case *corev1.Pod:
				pods = append(pods, o)
			}
		}
	}
	if ds == nil || sa == nil || binding == nil || role == nil || vap == nil || len(classes) < 4 || len(templates) == 0 || len(pods) == 0 {
		t.Fatalf("deploy/kubernetes lacks objects: daemonset %v, service account %v, binding %v, role %v, policy %v, %d classes, %d templates, %d pods",
			ds != nil, sa != nil, binding != nil, role != nil, vap != nil, len(classes), len(templates), len(pods))
	}

	// The DaemonSet: the host paths are the same inside; its service account is the bound one.
	spec := ds.Spec.Template.Spec
	if spec.ServiceAccountName != sa.Name || ds.Namespace != sa.Namespace {
		t.Errorf("daemonset runs as %s/%s, the service account is %s/%s", ds.Namespace, spec.ServiceAccountName, sa.Namespace, sa.Name)
	}
	vols := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			vols[v.Name] = v.HostPath.Path
		}
	}
	mounted := map[string]bool{}
	for _, m := range spec.Containers[0].VolumeMounts {
		if vols[m.Name] != m.MountPath {
			t.Errorf("volume %s: host path %q mounted at %q: the kubelet and runtime use the plugin's paths, they must be equal", m.Name, vols[m.Name], m.MountPath)
		}
		mounted[m.MountPath] = true
	}
	for _, p := range []string{"/var/lib/kubelet/plugins_registry", "/var/lib/kubelet/plugins/" + DriverName, DefaultCDIDir, filepath.Dir(DefaultContainerClaimSock)} {
		if !mounted[p] {
			t.Errorf("daemonset does not mount %s", p)
		}
	}
	if s := binding.Subjects; len(s) != 1 || s[0].Name != sa.Name || s[0].Namespace != sa.Namespace || binding.RoleRef.Name != role.Name {
		t.Errorf("cluster role binding %+v does not bind %s to %s", binding, sa.Name, role.Name)
	}
	user := "system:serviceaccount:" + sa.Namespace + ":" + sa.Name
	if len(vap.Spec.MatchConditions) != 1 || !strings.Contains(vap.Spec.MatchConditions[0].Expression, `"`+user+`"`) {
		t.Errorf("admission policy does not match the plugin's user %s: %+v", user, vap.Spec.MatchConditions)
	}

	// The selectors against devices as the plugin publishes them.
	ivshmem := &brokerv1.Device{Bdf: "0000:03:00.0", VendorId: 0x1af4, DeviceId: 0x1110, Usable: true, DmaBufSupported: true,
		Bars: []*brokerv1.Bar{{Index: 2, Size: 1 << 20, Mem: true, Prefetch: true, Addr64: true}}}
	gpu := &brokerv1.Device{Bdf: "0000:41:00.0", VendorId: 0x10de, DeviceId: 0x2330, Usable: true, DmaBufSupported: true,
		Bars: []*brokerv1.Bar{{Index: 2, Size: 64 << 30, Mem: true, Prefetch: true, Addr64: true}},
		Tsm:  &brokerv1.TsmState{Present: true, Connect: "tsm0", Bound: "tsm0"},
		Policy: &brokerv1.DevicePolicy{AllowedKinds: []brokerv1.LeaseKind{
			brokerv1.LeaseKind_LEASE_KIND_SHARED, brokerv1.LeaseKind_LEASE_KIND_PRIVATE}}}
	quarter := &brokerv1.Device{Bdf: "0000:04:00.0", VendorId: 0x1af4, DeviceId: 0x1110, Usable: true, DmaBufSupported: true,
		Bars: []*brokerv1.Bar{{Index: 2, Size: 4 << 20, Mem: true}}}
	devs := map[string]resourceapi.Device{}
	for _, d := range []*brokerv1.Device{ivshmem, gpu, quarter} {
		parts := []Partition{{BDF: quarter.Bdf, BAR: 2, Count: 4}}
		ts, err := targets(d, parts)
		if err != nil {
			t.Fatal(err)
		}
		devs[d.Bdf] = resourceDevice(d, ts[0], nil)
	}
	matches := func(what string, sel []resourceapi.DeviceSelector) map[string]bool {
		out := map[string]bool{}
		for bdf, d := range devs {
			out[bdf] = true
			for _, s := range sel {
				res := cel.GetCompiler(cel.Features{}).CompileCELExpression(s.CEL.Expression, cel.Options{})
				if res.Error != nil {
					t.Fatalf("%s: %v", what, res.Error)
				}
				ok, _, err := res.DeviceMatches(context.Background(), cel.Device{Driver: DriverName, Attributes: d.Attributes, Capacity: d.Capacity})
				if err != nil {
					t.Fatalf("%s on %s: %v", what, d.Name, err)
				}
				out[bdf] = out[bdf] && ok
			}
		}
		return out
	}
	for name, want := range map[string][]string{
		DriverName:                               {ivshmem.Bdf, gpu.Bdf, quarter.Bdf},
		"large-prefetchable.mmio.mmiobroker.dev": {gpu.Bdf},
		"private.mmio.mmiobroker.dev":            {gpu.Bdf},
		"ivshmem.mmio.mmiobroker.dev":            {ivshmem.Bdf, quarter.Bdf},
	} {
		c := classes[name]
		if c == nil {
			t.Errorf("no DeviceClass %s", name)
			continue
		}
		got := matches("DeviceClass "+name, c.Spec.Selectors)
		for bdf, ok := range got {
			if ok != slices.Contains(want, bdf) {
				t.Errorf("DeviceClass %s on %s: %v, want %v", name, devs[bdf].Name, ok, !ok)
			}
		}
	}
	// The private class configures private leases, as the plugin decodes its config.
	pc := classes["private.mmio.mmiobroker.dev"]
	var cfg []resourceapi.DeviceAllocationConfiguration
	for _, c := range pc.Spec.Config {
		cfg = append(cfg, resourceapi.DeviceAllocationConfiguration{Source: resourceapi.AllocationConfigSourceClass, DeviceConfiguration: c.DeviceConfiguration})
	}
	if k, err := leaseKind(cfg, "any"); err != nil || k != brokerv1.LeaseKind_LEASE_KIND_PRIVATE {
		t.Errorf("the private class's config gives lease kind %v, %v", k, err)
	}

	// The example: the template's request selects the whole ivshmem BAR, not its quarter;
	// the launcher pod's container uses the template's claim.
	for _, p := range pods {
		for _, c := range p.Spec.ResourceClaims {
			tmpl := templates[*c.ResourceClaimTemplateName]
			if tmpl == nil || tmpl.Namespace != p.Namespace {
				t.Fatalf("pod %s: claim %s from template %v, which is not in deploy/kubernetes", p.Name, c.Name, c.ResourceClaimTemplateName)
			}
			for _, r := range tmpl.Spec.Spec.Devices.Requests {
				class := classes[r.Exactly.DeviceClassName]
				if class == nil {
					t.Fatalf("template %s: no DeviceClass %s", tmpl.Name, r.Exactly.DeviceClassName)
				}
				got := matches("template "+tmpl.Name, append(slices.Clone(class.Spec.Selectors), r.Exactly.Selectors...))
				if !got[ivshmem.Bdf] || got[quarter.Bdf] || got[gpu.Bdf] {
					t.Errorf("template %s request %s selects %v, want the whole ivshmem BAR alone", tmpl.Name, r.Name, got)
				}
			}
		}
		uses := false
		for _, ctr := range p.Spec.Containers {
			for _, rc := range ctr.Resources.Claims {
				uses = uses || slices.ContainsFunc(p.Spec.ResourceClaims, func(c corev1.PodResourceClaim) bool { return c.Name == rc.Name })
			}
		}
		if !uses {
			t.Errorf("pod %s: no container uses its claims", p.Name)
		}
	}
}
